"""Named ViT variants and the builders the rest of vitpipe uses.

A variant is a complete set of ``VisionTransformer`` arguments; ``build_model(name, **kw)``
overrides any of them. Overrides are validated through ``ModelConfig`` so a typo or an
inconsistent shape is a ``ConfigError`` that names the key and what to do.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..config.base import ConfigError, validate
from ..config.model import ModelConfig
from .vit import VisionTransformer

_IMAGENET = dict(img_size=224, in_chans=3, num_classes=1000)
# 28x28 grayscale (Fashion-MNIST): widths kept small enough to train on a laptop CPU
_SMALL_IMG = dict(img_size=28, in_chans=1, num_classes=10)
_DEFAULTS: dict[str, Any] = dict(
    mlp_ratio=4.0, qkv_bias=True, pos_embed="learned", stem="patch", global_pool="token",
    drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, layer_scale_init=None,
    zero_head=False,
)
_WIDTHS = {  # embed_dim, depth, num_heads (ViT paper + DeiT tiny/small)
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
    "large": (1024, 24, 16), "huge": (1280, 32, 16),
}
_WIDTHS_28 = {"tiny": (96, 6, 3), "small": (192, 8, 6)}


def _variants() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for size, (d, depth, heads) in _WIDTHS.items():
        for p in (16, 14, 32):
            if p == 14 and size not in ("large", "huge", "base", "small"):
                continue
            if p == 32 and size not in ("base", "large"):
                continue
            out[f"vit_{size}_patch{p}_224"] = dict(
                _IMAGENET, patch_size=p, embed_dim=d, depth=depth, num_heads=heads)
    for size, (d, depth, heads) in _WIDTHS_28.items():
        for p in (4, 7):
            out[f"vit_{size}_patch{p}_28"] = dict(
                _SMALL_IMG, patch_size=p, embed_dim=d, depth=depth, num_heads=heads)
    d, depth, heads = _WIDTHS_28["tiny"]
    out["vit_tiny_conv4_28"] = dict(
        _SMALL_IMG, patch_size=4, embed_dim=d, depth=depth, num_heads=heads, stem="conv")
    return {k: {**_DEFAULTS, **v} for k, v in out.items()}


VARIANTS: dict[str, dict[str, Any]] = _variants()


def list_models() -> list[str]:
    """Every registered variant name, sorted."""
    return sorted(VARIANTS)


def resolve(name: str, **overrides: Any) -> dict[str, Any]:
    """The complete, checked ``VisionTransformer`` kwargs of ``name`` with ``overrides``."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model '{name}'.{hint} `vitpipe model-info` lists shapes; "
            f"registered: {', '.join(list_models())}"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    validate(ModelConfig, {"name": name, **overrides}, f"model overrides for {name}")
    kw = {**VARIANTS[name], **overrides}
    _check(name, kw)
    return kw


def _check(name: str, kw: dict[str, Any]) -> None:
    """Shape consistency once variant values and overrides are merged."""
    problems = []
    if kw["img_size"] % kw["patch_size"]:
        problems.append(f"model.patch_size={kw['patch_size']} does not divide "
                        f"model.img_size={kw['img_size']}")
    if kw["embed_dim"] % kw["num_heads"]:
        problems.append(f"model.num_heads={kw['num_heads']} does not divide "
                        f"model.embed_dim={kw['embed_dim']}")
    p = kw["patch_size"]
    if kw["stem"] == "conv" and (p < 2 or p & (p - 1)):
        problems.append(f"model.stem=conv needs a power-of-two patch_size, got {p}")
    if kw["pos_embed"] == "sincos" and kw["embed_dim"] % 4:
        problems.append(f"model.pos_embed=sincos needs embed_dim divisible by 4, "
                        f"got {kw['embed_dim']}")
    if problems:
        raise ConfigError(f"invalid model '{name}': " + "; ".join(problems))


def build_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered variant, e.g. ``build_model("vit_tiny_patch4_28", depth=4)``."""
    return VisionTransformer(**resolve(name, **overrides))


def build_from_config(cfg: ModelConfig) -> VisionTransformer:
    """Build the model a ``ModelConfig`` describes (its ``name`` plus set fields)."""
    return build_model(cfg.name, **cfg.overrides())
