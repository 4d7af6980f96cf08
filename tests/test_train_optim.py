"""Recipe pieces: weight-decay exemptions, layer-wise lr decay, warmup+cosine, EMA math."""

from __future__ import annotations

import math

import pytest
import torch

from vitpipe.config import OptimConfig
from vitpipe.models import build_model
from vitpipe.train.ema import ModelEma
from vitpipe.train.optim import (
    WarmupCosine,
    build_optimizer,
    lr_at,
    no_decay_names,
    param_groups,
    scaled_lr,
)


def tiny_vit(**kw):
    return build_model("vit_tiny_patch7_28", depth=2, embed_dim=32, num_heads=2,
                       num_classes=10, **kw)


def test_no_weight_decay_on_norms_biases_pos_and_cls():
    model = tiny_vit()
    exempt = no_decay_names(model)
    names = dict(model.named_parameters())
    for n, p in names.items():
        if p.ndim <= 1 or n.startswith(("pos_embed", "cls_token")):
            assert n in exempt, n
        else:
            assert n not in exempt, n
    assert any(n.startswith("pos_embed") for n in exempt)
    assert "cls_token" in exempt
    groups = param_groups(model, weight_decay=0.05)
    for g in groups:
        for n in g["names"]:
            assert g["weight_decay"] == (0.0 if n in exempt else 0.05)
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_layer_wise_lr_decay_scales():
    model = tiny_vit()  # depth 2 -> layers 0 (embed), 1, 2 (blocks), 3 (head)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["blocks.1.attn.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.25
    assert by_name["cls_token"]["lr_scale"] == 0.125
    assert by_name["cls_token"]["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(), layer_decay=0.5)
    sched = WarmupCosine(opt, base_lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    sched.step()
    head = next(g for g in opt.param_groups if g["layer_id"] == 3)
    embed = next(g for g in opt.param_groups if g["layer_id"] == 0)
    assert embed["lr"] == pytest.approx(head["lr"] * 0.125)


def test_warmup_then_cosine():
    base, lo, warm, total = 1.0, 0.1, 4, 14
    lrs = [lr_at(s, base, lo, warm, total) for s in range(total + 1)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(lo)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_scheduler_state_is_the_step():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0)
    a = WarmupCosine(opt, 1.0, 0.0, 3, 10)
    for _ in range(5):
        a.step()
    b = WarmupCosine(opt, 1.0, 0.0, 3, 10)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr == opt.param_groups[0]["lr"]


def test_base_lr_scaling():
    assert scaled_lr(OptimConfig(blr=1e-3), 512) == pytest.approx(2e-3)
    assert scaled_lr(OptimConfig(blr=1e-3, lr=5e-4), 512) == 5e-4


def test_ema_math():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expect = 0.9 * (0.9 * w0 + 0.1 * (w0 + 1.0)) + 0.1 * (w0 + 2.0)
    assert torch.allclose(ema.module.weight, expect)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        ModelEma(model, decay=1.0)


def test_groups_see_through_ddp_and_compile_wrappers():
    class Wrapper(torch.nn.Module):  # same attribute/prefix as DDP
        def __init__(self, m):
            super().__init__()
            self.module = m

    plain = param_groups(tiny_vit(), 0.05, layer_decay=0.5)
    wrapped = param_groups(Wrapper(tiny_vit()), 0.05, layer_decay=0.5)
    assert [(g["layer_id"], g["weight_decay"], len(g["params"])) for g in plain] == \
        [(g["layer_id"], g["weight_decay"], len(g["params"])) for g in wrapped]
    assert "module.pos_embed.weight" in no_decay_names(Wrapper(tiny_vit()))
