"""What every training task answers; the defaults are those of a supervised classifier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...config import ConfigError, TrainConfig


@dataclass
class Setup:
    """What a task may need while it prepares its model (before ``accelerate.prepare``)."""

    acc: Any
    out_dir: Path
    tracking_uri: str | None


class Task:
    """A training mode. The engine calls, in order: ``build_model``, ``setup``, ``loss`` per
    micro-batch, ``export`` at the end. Class flags say what the engine wires in."""

    name: ClassVar[str]
    # ends in a classifier: val top-1 each epoch, MixUp/CutMix, layer-wise lr decay,
    # weights/model.safetensors (what evaluate and register take)
    classifier: ClassVar[bool] = True
    pretraining: ClassVar[bool] = False  # its pipeline stage is `pretrain` (CLI default)
    plots: ClassVar[tuple[str, ...]] = ()  # figures `export` logs (the flow shows them)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.mix = None

    # ---- model ---------------------------------------------------------------------------
    def build_model(self, num_classes: int) -> torch.nn.Module:
        from ...models import build_from_config

        given = self.cfg.model.num_classes
        if given is not None and given != num_classes:
            raise ConfigError(f"model.num_classes={given} but the manifest has "
                              f"{num_classes} classes; drop model.num_classes or fix it")
        return build_from_config(self.cfg.model.model_copy(update={"num_classes": num_classes}))

    def setup(self, model: torch.nn.Module, ctx: Setup) -> str | None:
        """Load what the model starts from; returns a line for the log (or None)."""
        return None

    def image_size(self, model: torch.nn.Module) -> int:
        return self.cfg.data.augment.img_size or model.img_size

    def layer_decay(self) -> float | None:
        return self.cfg.train.layer_decay if self.classifier else None

    def build_mix(self, num_classes: int) -> None:
        if self.classifier:
            from ...data.transforms import build_mix

            self.mix = build_mix(self.cfg.data.augment, num_classes)

    # ---- loss ----------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            x, y = self.mix(x, y)
        return F.cross_entropy(model(x).float(), y,
                               label_smoothing=self.cfg.train.label_smoothing)

    # ---- output --------------------------------------------------------------------------
    def export(self, acc, model, ema, out_dir: Path, tracker, manifest) -> Path:
        from ..artifacts import export_classifier

        return export_classifier(self.cfg, acc, model, ema, out_dir, tracker, manifest)
