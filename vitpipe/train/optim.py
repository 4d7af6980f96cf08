"""AdamW parameter groups (no decay on norms/biases/tokens, layer-wise lr decay) and the
per-step warmup + cosine schedule.

The schedule is a pure function of the optimizer step, so exact resume only needs the step
(saved in the checkpoint) -- no opaque scheduler pickle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import OptimConfig
from ..weights import strip_wrapper_prefix, unwrap_module


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters exempt from weight decay: the model's list plus every ``ndim <= 1``."""
    base = unwrap_module(model)
    listed = set(base.no_weight_decay()) if hasattr(base, "no_weight_decay") else set()
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or strip_wrapper_prefix(name) in listed}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups keyed by (layer, decay?); each carries ``lr_scale`` and readable names.

    With ``layer_decay`` the model must offer ``layer_id(name) -> [0, depth + 1]`` and ``depth``:
    layer ``i`` gets ``lr_scale = layer_decay ** (depth + 1 - i)`` (the head: 1.0), as in MAE.
    """
    exempt = no_decay_names(model)
    base = unwrap_module(model)
    num_layers = None
    if layer_decay is not None:
        if not hasattr(base, "layer_id") or not hasattr(base, "depth"):
            raise TypeError(f"{type(base).__name__} has no layer_id/depth for layer-wise lr decay")
        num_layers = int(base.depth) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = name not in exempt
        layer = int(base.layer_id(strip_wrapper_prefix(name))) if num_layers is not None else 0
        if num_layers is not None and not 0 <= layer <= num_layers:
            raise ValueError(f"layer_id({name!r}) = {layer} outside [0, {num_layers}]")
        scale = layer_decay ** (num_layers - layer) if num_layers is not None else 1.0
        g = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, layer_decay: float | None = None
                    ) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (lr is set every step by :class:`WarmupCosine`)."""
    groups = param_groups(model, cfg.weight_decay, layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas))


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 gets base/warmup), then cosine to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """``train.lr`` if given, else ``blr * effective_batch / 256`` (the MAE/DeiT rule)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / 256


class WarmupCosine:
    """Sets every group's lr to ``lr_scale * lr_at(step)``; its state is just the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float,
                 warmup_steps: int, total_steps: int) -> None:
        self.optimizer = optimizer
        self.base_lr, self.min_lr = base_lr, min(min_lr, base_lr)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.step_count = 0
        self.apply()

    @property
    def lr(self) -> float:
        return lr_at(self.step_count, self.base_lr, self.min_lr, self.warmup_steps,
                     self.total_steps)

    def apply(self) -> None:
        lr = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step"])
        self.apply()


def group_summary(groups: Iterable[dict[str, Any]]) -> list[str]:
    """One line per group, for logs: layer, decay, lr scale, parameter count."""
    return [
        f"layer {g.get('layer_id', 0):>2} wd={g['weight_decay']:<6g} lr_scale={g['lr_scale']:.4f} "
        f"n={sum(p.numel() for p in g['params'])}"
        for g in groups
    ]
