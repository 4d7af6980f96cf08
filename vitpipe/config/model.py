"""Model section: a named ViT variant plus overrides, checked for shape consistency."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel


class ModelConfig(StrictModel):
    """Which ViT to build. ``name`` picks a registered variant; set fields override it.

    Fields left ``None`` take the variant's value (see ``vitpipe.models.registry``).
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
    global_pool: Literal["token", "avg"] | None = None
    drop_rate: float | None = Field(None, ge=0, lt=1)
    attn_drop_rate: float | None = Field(None, ge=0, lt=1)
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    layer_scale_init: float | None = Field(None, gt=0)
    zero_head: bool | None = None  # zero-initialised classifier (common for fine-tuning)

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.img_size and self.patch_size and self.img_size % self.patch_size:
            raise ValueError(
                f"model.patch_size={self.patch_size} does not divide model.img_size={self.img_size}"
            )
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.embed_dim={self.embed_dim}"
            )
        return self

    def overrides(self) -> dict:
        """The fields set explicitly (not None), as kwargs for ``build_model``."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}


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
