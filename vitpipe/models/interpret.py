"""Where a ViT looks: attention rollout, last-layer class-token attention, heat-map overlays.

All functions return tensors/arrays; writing images is the caller's job (``vitpipe.evaluate``).
A model without a class token (``global_pool='avg'``) is read through the mean over query
tokens, i.e. what the pooled representation attends to.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .vit import VisionTransformer


def _query_row(attn: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, ..., T, T) -> (B, ..., N): the class token's row, or the mean row without one."""
    row = attn[..., 0, :] if prefix else attn.mean(dim=-2)
    return row[..., prefix:]


@torch.no_grad()
def attention_rollout(model: VisionTransformer, x: torch.Tensor,
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) -> (B, gh, gw), each map summing to 1.

    Per layer: average heads, optionally zero the weakest ``discard_ratio`` of entries, add
    the identity for the residual path, renormalise rows; multiply through the layers.
    """
    maps = model.attention_maps(x)
    b, _, t, _ = maps[0].shape
    eye = torch.eye(t, device=x.device, dtype=maps[0].dtype)
    rollout = eye.expand(b, t, t)
    for attn in maps:
        a = attn.mean(dim=1)  # (B, T, T)
        if discard_ratio > 0:
            flat = a.reshape(b, -1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                idx = flat.topk(k, dim=1, largest=False).indices
                flat = flat.scatter(1, idx, 0.0)
                a = flat.reshape(b, t, t)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    heat = _query_row(rollout, model.num_prefix_tokens)  # (B, N)
    heat = heat / heat.sum(dim=-1, keepdim=True)
    return heat.reshape(b, *model.grid_size)


@torch.no_grad()
def cls_attention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Last block's attention from the class token to each patch, per head: (B, h, gh, gw)."""
    attn = model.attention_maps(x)[-1]  # (B, h, T, T)
    heat = _query_row(attn, model.num_prefix_tokens)  # (B, h, N)
    return heat.reshape(*heat.shape[:2], *model.grid_size)


def overlay(image: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray,
            alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over an image -> (H, W, 3) uint8 RGB.

    ``image``: (C, H, W) tensor or (H, W[, C]) array, any value range (min-max scaled);
    ``heat``: (h, w) at any resolution, upsampled bilinearly to (H, W).
    """
    import matplotlib

    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    img = img.detach().float().cpu()
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (C, H, W) or (H, W[, C]) with 1 or 3 channels, "
                         f"got {tuple(img.shape)}")
    img = img.expand(-1, -1, 3)
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)

    h = torch.as_tensor(np.asarray(heat) if not isinstance(heat, torch.Tensor) else heat)
    h = h.detach().float().cpu()
    if h.ndim != 2:
        raise ValueError(f"heat must be a 2-D map (h, w), got {tuple(h.shape)}")
    h = F.interpolate(h[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-8)
    colored = torch.from_numpy(matplotlib.colormaps[cmap](h.numpy())[..., :3]).float()
    out = (1 - alpha) * img + alpha * colored
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
