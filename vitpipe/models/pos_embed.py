"""Position embeddings for the patch grid, and their resampling to a new grid.

Three kinds, all (1, N, D) over the N = gh * gw patches (prefix tokens such as the class
token carry no position; a learned class token absorbs any constant offset):

- ``learned``: one free vector per patch (ViT), resampled bicubically as a 2-D image.
- ``factorized``: a row table (gh, D) plus a column table (gw, D); far fewer parameters,
  each table resampled along its own axis.
- ``sincos``: fixed 2-D sine-cosine (MAE); nothing learned, recomputed for a new grid.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PosEmbedKind = Literal["learned", "factorized", "sincos"]


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine table (N, D): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                                torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    r = rows.reshape(-1, 1) * omega  # (N, D/4)
    c = cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()  # (N, D)


def resample_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, gh*gw, D) table laid out row-major on the ``old`` grid."""
    if tuple(old) == tuple(new):
        return pos
    d = pos.shape[-1]
    img = pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    img = F.interpolate(img, size=tuple(new), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d).to(pos.dtype)


def resample_axis(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Bicubic resize of a (1, L, D) per-axis table to (1, new_len, D)."""
    if table.shape[1] == new_len:
        return table
    img = table.transpose(1, 2).unsqueeze(-1).float()  # (1, D, L, 1)
    img = F.interpolate(img, size=(new_len, 1), mode="bicubic", align_corners=False)
    return img.squeeze(-1).transpose(1, 2).to(table.dtype)


class PosEmbed(nn.Module):
    """Adds position embeddings to patch tokens (B, N, D) on a ``grid`` of (gh, gw).

    Parameters: ``weight`` (learned; a non-persistent buffer for sincos) or ``row``/``col``.
    """

    def __init__(self, kind: PosEmbedKind, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.grid = tuple(grid)
        self.dim = dim
        gh, gw = grid
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(1, gh * gw, dim))
        elif kind == "factorized":
            self.row = nn.Parameter(torch.zeros(1, gh, dim))
            self.col = nn.Parameter(torch.zeros(1, gw, dim))
        elif kind == "sincos":
            # not persistent: state dicts stay grid-independent, recomputed on resampling
            self.register_buffer("weight", sincos_2d(grid, dim)[None], persistent=False)
        else:
            raise ValueError(f"pos_embed must be learned, factorized or sincos, got {kind!r}")

    def table(self) -> torch.Tensor:
        """The (1, N, D) table for the current grid."""
        if self.kind == "factorized":
            gh, gw = self.grid
            rows = self.row[:, :, None, :]  # (1, gh, 1, D)
            cols = self.col[:, None, :, :]  # (1, 1, gw, D)
            return (rows + cols).reshape(1, gh * gw, self.dim)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table()

    @torch.no_grad()
    def set_grid(self, grid: tuple[int, int]) -> None:
        """Resample in place to a new grid (bicubic for learned tables, recompute for sincos)."""
        grid = tuple(grid)
        if grid == self.grid:
            return
        if self.kind == "learned":
            self.weight = nn.Parameter(resample_grid(self.weight.data, self.grid, grid))
        elif self.kind == "factorized":
            self.row = nn.Parameter(resample_axis(self.row.data, grid[0]))
            self.col = nn.Parameter(resample_axis(self.col.data, grid[1]))
        else:
            self.weight = sincos_2d(grid, self.dim)[None].to(self.weight.device)
        self.grid = grid

    def extra_repr(self) -> str:
        return f"kind={self.kind}, grid={self.grid}, dim={self.dim}"
