"""Named ViT variants and the builders the rest of vitpipe uses.

A variant is a complete set of ``VisionTransformer`` arguments (the table is plain data in
``vitpipe.config.model`` so configs are checked when loaded); ``build_model(name, **kw)``
overrides any of them. Overrides go through ``ModelConfig``, so a typo or an inconsistent
shape is a ``ConfigError`` that names the key and what to do.
"""

from __future__ import annotations

from typing import Any

from ..config.base import validate
from ..config.model import MODEL_VARIANTS, ModelConfig
from .vit import VisionTransformer

VARIANTS = MODEL_VARIANTS


def list_models() -> list[str]:
    """Every registered variant name, sorted."""
    return sorted(VARIANTS)


def resolve(name: str, **overrides: Any) -> dict[str, Any]:
    """The complete, checked ``VisionTransformer`` kwargs of ``name`` with ``overrides``."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = validate(ModelConfig, {"name": name, **overrides}, "model overrides")
    return cfg.resolved()


def build_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered variant, e.g. ``build_model("vit_tiny_patch4_28", depth=4)``."""
    return VisionTransformer(**resolve(name, **overrides))


def build_from_config(cfg: ModelConfig) -> VisionTransformer:
    """Build the model a ``ModelConfig`` describes (its ``name`` plus set fields)."""
    return VisionTransformer(**cfg.resolved())
