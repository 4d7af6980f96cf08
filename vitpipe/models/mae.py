"""Masked autoencoder (He et al. 2022) around a ``VisionTransformer`` encoder.

    imgs -> encoder.embed_patches (B, N, D) -> keep a random (1 - r) N per sample
         -> encoder.forward_tokens (B, 1 + n_keep, D)     (the encoder never sees masked patches)
         -> decoder_embed (Dd) -> insert mask tokens, unshuffle -> + fixed sin-cos positions
         -> decoder blocks -> predict p*p*C pixels per patch
    loss = MSE on masked patches only (optionally against per-patch normalised pixels).

The encoder is used only through its public ``embed_patches`` / ``forward_tokens`` split, so
``encoder_state_dict()`` loads straight into a classifier for fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.model import MAEConfig, ModelConfig
from .layers import Block
from .pos_embed import sincos_2d
from .vit import VisionTransformer, _init_module


def random_masking(n: int, len_keep: int, batch: int, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subset: (ids_keep (B, k), ids_restore (B, N), mask (B, N), 1 = masked).

    Sorting uniform noise gives a random permutation per sample; its first ``len_keep`` entries
    are kept, and ``ids_restore`` (the inverse permutation) puts tokens back in grid order.
    """
    noise = torch.rand(batch, n, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, n, device=device)
    mask[:, :len_keep] = 0
    mask = mask.gather(1, ids_restore)  # back to grid order
    return ids_keep, ids_restore, mask


class MaskedAutoencoder(nn.Module):
    """MAE pretraining wrapper; ``encoder`` is a ``VisionTransformer`` (its head is unused)."""

    def __init__(self, encoder: VisionTransformer, decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True) -> None:
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size
        self.in_chans = encoder.in_chans
        d, dd, prefix = encoder.embed_dim, decoder_embed_dim, encoder.num_prefix_tokens

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        pos = torch.cat([torch.zeros(prefix, dd), sincos_2d(encoder.grid_size, dd)])  # (T, Dd)
        self.register_buffer("decoder_pos_embed", pos[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, decoder_num_heads, 4.0, qkv_bias=True) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch_size**2 * self.in_chans)
        self._init_decoder()

    @torch.no_grad()
    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(_init_module)

    # ---- pixels <-> patches -----------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in row-major grid order, pixels (p, p, C)."""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); inverse of ``patchify``."""
        p, c = self.patch_size, self.in_chans
        gh, gw = self.encoder.grid_size
        b = x.shape[0]
        x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    # ---- forward ----------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only: (latent (B, prefix + k, D), mask, ids_restore)."""
        x = self.encoder.embed_patches(imgs)  # (B, N, D)
        b, n, d = x.shape
        len_keep = max(1, int(round(n * (1 - mask_ratio))))
        ids_keep, ids_restore, mask = random_masking(n, len_keep, b, x.device)
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, d))  # (B, k, D)
        return self.encoder.forward_tokens(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent of visible tokens -> pixel predictions for every patch (B, N, p*p*C)."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + k, Dd)
        b, _, dd = x.shape
        n = ids_restore.shape[1]
        masks = self.mask_token.expand(b, n - (x.shape[1] - prefix), -1)
        patches = torch.cat([x[:, prefix:], masks], dim=1)  # shuffled order
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, dd))  # grid order
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, N, p*p*C), mask (B, N) with 1 = masked)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(imgs, pred, mask), pred, mask

    # ---- export -----------------------------------------------------------------------------
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights without a head: loads into a classifier for fine-tuning."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("head.")}

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}


def build_mae(model_cfg: ModelConfig, mae_cfg: MAEConfig) -> MaskedAutoencoder:
    """MAE whose encoder is ``model_cfg``'s ViT without a head."""
    from .registry import build_model

    kw = model_cfg.overrides()
    kw["num_classes"] = 0
    encoder = build_model(model_cfg.name, **kw)
    return MaskedAutoencoder(encoder, mae_cfg.decoder_embed_dim, mae_cfg.decoder_depth,
                             mae_cfg.decoder_num_heads, mae_cfg.mask_ratio, mae_cfg.norm_pix_loss)
