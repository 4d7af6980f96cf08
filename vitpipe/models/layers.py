"""Transformer building blocks: patch embeddings, attention, MLP, pre-norm block.

Shapes: B batch, C channels, H/W image size, p patch size, N = gh * gw patches,
T = prefix + N tokens, D width, h heads, hd = D // h head width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.model import patch_factors


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D, as a strided conv: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, N, D)


class ConvStem(nn.Module):
    """Hybrid stem (Xiao et al. 2021): 3x3 conv-BN-GELU layers, then a projection to D.

    ``patch_size = 2^k * r`` (r odd): k stride-2 convs halve the grid k times, and the
    projection (r x r, stride r; 1x1 when r = 1) finishes it, so the output grid equals the
    patch grid: 28x28 with p=4 -> 14x14 -> 7x7; with p=7 -> one stride-1 conv at 28x28, then
    7x7/7 -> 4x4. Widths double towards D (D/2^k, ..., D/2); the stride-1 conv has D/4 (at
    full resolution its BatchNorm and GELU cost about a fifth of a 28px model's step).
    ``widths`` replaces those stage widths: any stride-1 stages first, then the k stride-2
    ones (``model.stem_widths``; e.g. (16, 32) at p=7: two stride-1 convs at 28x28).
    Its receptive field is wider than a patch, so under MAE a visible token also sees a few
    pixels of its masked neighbours.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, widths: Sequence[int] | None = None) -> None:
        super().__init__()
        n, r = patch_factors(patch_size)  # patch >= 2, enough widths: ModelConfig checks
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        layers: list[nn.Module] = []
        cin = in_chans
        if widths is None:
            widths = ([max(embed_dim // 2 ** (n - i), 8) for i in range(n)]
                      or [max(embed_dim // 4, 8)])
        first_strided = len(widths) - n  # stride-1 stages first, then the k halvings
        for i, cout in enumerate(widths):
            stride = 2 if i >= first_strided else 1
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.GELU()]
            cin = cout
        self.stem = nn.Sequential(*layers)
        self.r = r
        # an r x r, stride-r conv, as patchify + linear: the same map, but the matmul's
        # backward is several times faster than oneDNN's for a kernel equal to its stride
        self.proj = nn.Linear(cin * r * r, embed_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C, H', W')
        b, c, h, w = x.shape
        r = self.r
        x = x.reshape(b, c, h // r, r, w // r, r).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, r, r)
        return self.proj(x.reshape(b, (h // r) * (w // r), c * r * r))  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The default path is ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels,
    the T x T matrix is never stored). ``return_attn=True`` takes the explicit path and also
    returns the softmax probabilities (B, h, T, T), for attention maps.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attn: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        # (B, T, 3D) -> (3, B, h, T, hd): views only, no copies
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        attn = None
        if return_attn:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, T, T)
            x = F.dropout(attn, drop, self.training) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, h, T, hd)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))
        return (x, attn) if return_attn else x


    def forward_queries(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Outputs (B, n, D) for the first ``n`` tokens only; all T tokens stay keys/values.

        Same numbers as ``forward(x)[:, :n]`` without the other T - n queries' work.
        """
        B, T, D = x.shape
        w_q, w_kv = self.qkv.weight.split([D, 2 * D])
        b_q, b_kv = self.qkv.bias.split([D, 2 * D]) if self.qkv.bias is not None else (None, None)
        q = F.linear(x[:, :n], w_q, b_q).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = F.linear(x, w_kv, b_kv).view(B, T, 2, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training
                                           else 0.0)  # (B, h, n, hd)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, n, D)))


class Mlp(nn.Module):
    """Two-layer GELU MLP: D -> hidden -> D."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample while training (identity in eval)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learned residual scale (CaiT), initialised small for deep models."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then the same for the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attn: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if return_attn:
            y, attn = self.attn(self.norm1(x), return_attn=True)
        else:
            y, attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attn else x

    def forward_queries(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``forward(x)[:, :n]`` at a fraction of the cost: attention, MLP for n tokens only."""
        x = x[:, :n] + self.drop_path1(self.ls1(self.attn.forward_queries(self.norm1(x), n)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
