"""timm ``VisionTransformer`` state dict -> ours (a pure dict transform, no I/O, no timm import).

Module names already match timm's (``blocks.{i}.attn.qkv``, ``mlp.fc1``, ``ls1.gamma``,
``norm``/``fc_norm``, ``head``). The one real difference is the class token's position:
timm keeps it in row 0 of ``pos_embed`` (1, 1 + N, D); ours has position tables for the
patches only, so that row is folded into the class token (``cls + pos[0]`` is what the
first block sees either way, hence identical logits).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import CheckpointError

_SUPPORTED = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|fc_norm\.(weight|bias)|head\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|blocks\.\d+\.(ls1|ls2)\.gamma)$"
)


def is_timm_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """timm stores ``pos_embed`` as a tensor; ours as the module ``pos_embed.weight``."""
    return "pos_embed" in sd and "pos_embed.weight" not in sd


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def convert_timm_state_dict(sd: dict[str, torch.Tensor],
                            pos_includes_cls: bool | None = None) -> dict[str, torch.Tensor]:
    """Map a timm ViT state dict onto ``VisionTransformer`` keys.

    ``pos_includes_cls`` None infers timm's ``no_embed_class`` from the table length
    (1 + square with a class token). Raises ``CheckpointError`` for timm features we do not
    implement (register tokens, qk-norm, pre-norm, attention pooling, ...).
    """
    unsupported = sorted(k for k in sd if not _SUPPORTED.match(k))
    if unsupported:
        shown = ", ".join(unsupported[:8]) + (" ..." if len(unsupported) > 8 else "")
        raise CheckpointError(
            f"timm checkpoint uses features vitpipe's ViT does not implement: {shown}. "
            "Only plain ViTs (class token or avg pool, optional layer scale) convert."
        )
    out = {k: v for k, v in sd.items() if k not in ("pos_embed", "cls_token")}
    pos = sd.get("pos_embed")
    cls = sd.get("cls_token")
    if pos is not None:
        length = pos.shape[1]
        if pos_includes_cls is None:
            pos_includes_cls = cls is not None and _is_square(length - 1) and not _is_square(length)
        if pos_includes_cls:
            if cls is None:
                raise CheckpointError("timm pos_embed has a class-token row but no cls_token")
            cls = cls + pos[:, :1]
            pos = pos[:, 1:]
        out["pos_embed.weight"] = pos
    if cls is not None:
        out["cls_token"] = cls
    return out
