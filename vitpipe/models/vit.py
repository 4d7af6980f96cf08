"""Vision Transformer (Dosovitskiy et al. 2021), readable top to bottom.

    image (B, C, H, W)
      -> embed_patches: patch/conv stem (B, N, D) + position embeddings
      -> forward_tokens: [cls] + tokens (B, T, D) -> depth x pre-norm Block -> LayerNorm
      -> forward_head: class token or mean of patch tokens (B, D) -> Linear (B, num_classes)

``embed_patches`` / ``forward_tokens`` are the public split the MAE uses to drop masked
patches between the two halves; ``forward_features`` is simply both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .layers import Block, ConvStem, PatchEmbed, to_2tuple
from .pos_embed import PosEmbed, PosEmbedKind


class VisionTransformer(nn.Module):
    """A ViT classifier. ``num_classes=0`` gives a headless encoder (features only)."""

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        pos_embed: PosEmbedKind,
        stem: Literal["patch", "conv"],
        global_pool: Literal["token", "avg"],
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        layer_scale_init: float | None,
        zero_head: bool,
        tta_hflip: bool,
        stem_widths: Sequence[int] | None,
    ) -> None:
        super().__init__()
        # Shape rules (patch divides image, heads divide width, conv stem needs), and every
        # argument's default, live once: vitpipe.config.model (checked when a config loads).
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.tta_hflip = tta_hflip
        self.num_prefix_tokens = 1 if global_pool == "token" else 0

        if stem == "conv":
            self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, stem_widths)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, embed_dim))
                          if self.num_prefix_tokens else None)
        self.pos_embed = PosEmbed(pos_embed, self.patch_embed.grid_size, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                  layer_scale_init)
            for i in range(depth)
        )
        # token pooling normalises every token; avg pooling normalises the pooled vector
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_head)

    # ---- init -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, zero_head: bool = False) -> None:
        """timm/ViT recipe: trunc-normal(.02) linears and position tables, tiny class token."""
        for p in self.pos_embed.parameters():
            nn.init.trunc_normal_(p, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_module)
        if isinstance(self.patch_embed, PatchEmbed):  # a linear map of a flattened patch
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if zero_head and isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ---- shapes -----------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def set_img_size(self, img_size: int) -> None:
        """Run at a new resolution: resample position embeddings to the new patch grid."""
        if img_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide img_size={img_size}")
        self.img_size = img_size
        self.patch_embed.img_size = to_2tuple(img_size)
        self.pos_embed.set_grid(self.patch_embed.grid_size)

    # ---- forward ----------------------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch tokens with positions (B, N, D); no prefix tokens."""
        if x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(
                f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), got "
                f"{tuple(x.shape)}; resize the input or call set_img_size()"
            )
        return self.pos_drop(self.pos_embed(self.patch_embed(x)))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Any subset of patch tokens (B, n, D) -> prepend class token -> blocks -> (B, T, D)."""
        x = self._prepend_prefix(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed_patches(x))  # (B, T, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
        x = self.head_drop(self.fc_norm(x))  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes).

        With ``tta_hflip`` in eval mode the logits are the mean over the images and their
        mirrors (one pass of 2B images): classes that flipping leaves unchanged, as the
        horizontal-flip augmentation taught the model, get two views of every test image.
        """
        if self.tta_hflip and not self.training:
            b = x.shape[0]
            out = self._logits(torch.cat([x, x.flip(-1)]))  # (2B, num_classes)
            return (out[:b] + out[b:]) / 2
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one view (B, num_classes).

        With class-token pooling only the class token of the last block is ever read, so that
        block runs its attention queries, projection and MLP for that one token (keys and
        values still cover every token): the same logits as
        ``forward_head(forward_features(x))`` for about (depth - 0.85) / depth of the work.
        """
        if self.global_pool != "token" or not len(self.blocks):
            return self.forward_head(self.forward_features(x))
        x = self._prepend_prefix(self.embed_patches(x))
        for blk in self.blocks[:-1]:
            x = blk(x)
        x = self.blocks[-1].forward_queries(x, self.num_prefix_tokens)  # (B, 1, D)
        return self.forward_head(self.norm(x))

    def _prepend_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block, each (B, heads, T, T), via the explicit path."""
        t = self._prepend_prefix(self.embed_patches(x))
        maps = []
        for blk in self.blocks:
            t, attn = blk(t, return_attn=True)
            maps.append(attn)
        return maps

    # ---- trainer hooks ----------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (re-initialised; ``0`` removes it)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.head = nn.Identity()
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=device)
            _init_module(self.head)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters exempt from weight decay: position tables and the class token."""
        return {n for n, _ in self.named_parameters() if n.startswith(("pos_embed.", "cls_token"))}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, i+1 block i, depth+1 head."""
        if name.startswith(("patch_embed.", "pos_embed.", "cls_token")):
            return 0
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
        return self.depth + 1


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
