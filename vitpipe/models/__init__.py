"""Pure ``nn.Module``s: ViT and its layers, MAE, complexity, attention maps, timm key mapping.

No file I/O and no data code here; loading weights from disk lives in ``vitpipe.weights``.
"""

from .mae import MaskedAutoencoder, build_mae
from .registry import VARIANTS, build_from_config, build_model, list_models, resolve
from .vit import VisionTransformer

__all__ = [
    "VARIANTS",
    "MaskedAutoencoder",
    "VisionTransformer",
    "build_from_config",
    "build_mae",
    "build_model",
    "list_models",
    "resolve",
]
