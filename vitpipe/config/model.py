"""Model section: a named ViT variant plus overrides, checked for shape consistency.

The variant table lives here (plain data, no torch) so a config is checked completely when it
is loaded: ``model.patch_size=5`` on a 28-pixel variant fails at ``vitpipe config show``, not
minutes later inside a training job. ``vitpipe.models.registry`` builds from the same table.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import StrictModel

# Every VisionTransformer argument's default, declared here once (the module has none).
MODEL_DEFAULTS: dict[str, Any] = dict(
    mlp_ratio=4.0, qkv_bias=True, pos_embed="learned", stem="patch", global_pool="token",
    drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, layer_scale_init=None,
    zero_head=False, tta_hflip=False, stem_widths=None,
)
_IMAGENET = dict(img_size=224, in_chans=3, num_classes=1000)
_FMNIST = dict(img_size=28, in_chans=1, num_classes=10)  # 28x28 grayscale, 10 classes
# (embed_dim, depth, num_heads, patch sizes): ViT paper sizes + DeiT tiny/small
_WIDTHS_224 = {"tiny": (192, 12, 3, (16,)), "small": (384, 12, 6, (16, 14)),
               "base": (768, 12, 12, (16, 14, 32)), "large": (1024, 24, 16, (16, 14, 32)),
               "huge": (1280, 32, 16, (16, 14))}
# 28-pixel variants: narrow and shallow enough to train on two CPU cores
_WIDTHS_28 = {"tiny": (96, 6, 3), "small": (192, 8, 6)}


def _variants() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for size, (d, depth, heads, patches) in _WIDTHS_224.items():
        for p in patches:
            out[f"vit_{size}_patch{p}_224"] = dict(
                _IMAGENET, patch_size=p, embed_dim=d, depth=depth, num_heads=heads)
    for size, (d, depth, heads) in _WIDTHS_28.items():
        for p in (4, 7):
            out[f"vit_{size}_patch{p}_28"] = dict(
                _FMNIST, patch_size=p, embed_dim=d, depth=depth, num_heads=heads)
    d, depth, heads = _WIDTHS_28["tiny"]
    for p in (4, 7):  # hybrid: a conv stem instead of patchify
        out[f"vit_tiny_conv{p}_28"] = dict(
            _FMNIST, patch_size=p, embed_dim=d, depth=depth, num_heads=heads, stem="conv")
    return {k: {**MODEL_DEFAULTS, **v} for k, v in out.items()}


MODEL_VARIANTS: dict[str, dict[str, Any]] = _variants()


def patch_factors(patch_size: int) -> tuple[int, int]:
    """``(k, r)`` with ``patch_size = 2^k * r``, r odd: a conv stem's stride-2 stages and the
    kernel of its projection (``layers.ConvStem``)."""
    k = (patch_size & -patch_size).bit_length() - 1
    return k, patch_size >> k


def shape_problems(kw: dict[str, Any]) -> list[str]:
    """What is inconsistent in a complete set of model arguments (empty when fine)."""
    problems = []
    p, d = kw["patch_size"], kw["embed_dim"]
    if kw["img_size"] % p:
        problems.append(f"model.patch_size={p} does not divide model.img_size={kw['img_size']}")
    if d % kw["num_heads"]:
        problems.append(f"model.num_heads={kw['num_heads']} does not divide model.embed_dim={d}")
    if kw["stem"] == "conv" and p < 2:
        problems.append(f"model.stem=conv needs model.patch_size >= 2, got {p}")
    widths = kw.get("stem_widths")
    if widths is not None:
        halvings = patch_factors(p)[0]
        if kw["stem"] != "conv":
            problems.append("model.stem_widths needs model.stem=conv")
        elif len(widths) < halvings or not widths or min(widths) < 1:
            problems.append(f"model.stem_widths={list(widths)}: patch {p} needs at least "
                            f"{max(halvings, 1)} positive width(s), the last {halvings} at "
                            "stride 2")
    if kw["pos_embed"] == "sincos" and d % 4:
        problems.append(f"model.pos_embed=sincos needs model.embed_dim divisible by 4, got {d}")
    return problems


class ModelConfig(StrictModel):
    """Which ViT to build. ``name`` picks a registered variant; set fields override it.

    Fields left ``None`` take the variant's value (``MODEL_VARIANTS``; ``vitpipe model-info``).
    """

    name: str = "vit_tiny_patch4_28"
    img_size: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)
    in_chans: int | None = Field(None, gt=0)
    num_classes: int | None = Field(None, ge=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    mlp_ratio: float | None = Field(None, gt=0)
    qkv_bias: bool | None = None
    pos_embed: Literal["learned", "factorized", "sincos"] | None = None
    stem: Literal["patch", "conv"] | None = None
    # conv stem: widths of its 3x3 conv-BN-GELU stages; the last k have stride 2 where
    # patch_size = 2^k * r (default: k stages widening to D/2, or one of D/4 when k = 0)
    stem_widths: tuple[int, ...] | None = None
    global_pool: Literal["token", "avg"] | None = None
    drop_rate: float | None = Field(None, ge=0, lt=1)
    attn_drop_rate: float | None = Field(None, ge=0, lt=1)
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    layer_scale_init: float | None = Field(None, gt=0)
    zero_head: bool | None = None  # zero-initialised classifier (common for fine-tuning)
    # eval mode: logits = mean over the image and its mirror (2x inference cost). Part of the
    # model, so validation, evaluation, `vitpipe predict` and the served pyfunc all agree
    tta_hflip: bool | None = None

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.name not in MODEL_VARIANTS:
            close = difflib.get_close_matches(self.name, MODEL_VARIANTS, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown model.name '{self.name}'{hint} Registered: "
                f"{', '.join(sorted(MODEL_VARIANTS))}"
            )
        problems = shape_problems(self.resolved())
        if problems:
            raise ValueError(f"model {self.name}: " + "; ".join(problems))
        return self

    def overrides(self) -> dict:
        """The fields set explicitly (not None), as kwargs for ``build_model``."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}

    def resolved(self) -> dict[str, Any]:
        """Complete ``VisionTransformer`` kwargs: the variant's values with the overrides."""
        return {**MODEL_VARIANTS[self.name], **self.overrides()}


class MAEConfig(StrictModel):
    """Masked-autoencoder settings (used when a training stage runs in ``mae`` mode)."""

    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_embed_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_num_heads: int = Field(4, gt=0)
    norm_pix_loss: bool = True

    @model_validator(mode="after")
    def _heads(self) -> MAEConfig:
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"mae.decoder_num_heads={self.decoder_num_heads} does not divide "
                f"mae.decoder_embed_dim={self.decoder_embed_dim}"
            )
        return self
