"""PNG plots: confusion matrix, reliability diagram, training curves, attention rollout
overlays and MAE reconstructions. Each function writes one file and returns its path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_confusion(cm: Sequence[Sequence[int]], class_names: list[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix with counts in the cells (rows = true class)."""
    plt = _plt()
    m = np.asarray(cm, dtype=np.float64)
    norm = m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_reliability(cal: dict, path: str | Path, title: str = "reliability") -> Path:
    """Accuracy vs confidence per bin, with the diagonal and the ECE in the title."""
    plt = _plt()
    edges = np.asarray(cal["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    acc = np.nan_to_num(np.asarray(cal["accuracy"], dtype=np.float64))
    conf = np.asarray(cal["confidence"], dtype=np.float64)
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, acc, width=width * 0.95, edgecolor="k", label="accuracy")
    has = ~np.isnan(conf)
    ax.plot(conf[has], acc[has], "o", color="tab:red", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {cal['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_training_curves(history: dict[str, list[tuple[int, float]]], path: str | Path,
                         title: str = "training") -> Path:
    """One panel per metric (loss, lr, val_top1, ...) against the optimizer step."""
    plt = _plt()
    keys = [k for k, v in history.items() if v]
    if not keys:
        raise ValueError("no metric history to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        pts = sorted(history[k])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _denorm(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
            ) -> torch.Tensor:
    """(B, C, H, W) normalised -> [0, 1] for display."""
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.tensor(list(mean), dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(list(std), dtype=x.dtype).view(1, -1, 1, 1)
        x = x * s + m
    return x.clamp(0, 1)


def _show(ax, img: torch.Tensor | np.ndarray, title: str | None = None) -> None:
    a = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else img
    if a.ndim == 3 and a.shape[-1] == 1:
        ax.imshow(a[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(a)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=7)


@torch.no_grad()
def plot_attention(model, images: torch.Tensor, path: str | Path, labels: list[str] | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                   ) -> Path:
    """Image over its attention-rollout heat map, one column per image."""
    from .models.interpret import attention_rollout, overlay

    plt = _plt()
    model.eval()
    heat = attention_rollout(model, images)
    shown = _denorm(images, mean, std)
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        _show(axes[0, i], shown[i], labels[i] if labels else None)
        _show(axes[1, i], overlay(shown[i], heat[i]))
    fig.suptitle("attention rollout")
    return _save(fig, path)


@torch.no_grad()
def plot_mae_reconstructions(mae, images: torch.Tensor, path: str | Path,
                             mean: Sequence[float] | None = None,
                             std: Sequence[float] | None = None) -> Path:
    """Rows: masked input / reconstruction (visible patches pasted back) / original.

    With ``norm_pix_loss`` the prediction is in per-patch normalised units; it is mapped back
    with each target patch's mean and variance, as in the MAE paper's visualisations.
    """
    plt = _plt()
    mae.eval()
    images = images.to(next(mae.parameters()).device)
    _, pred, mask = mae(images)
    if getattr(mae, "norm_pix_loss", False):
        target = mae.patchify(images)
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    recon = mae.unpatchify(pred.float())
    p, c = mae.patch_size, images.shape[1]
    m = mask[..., None].expand(-1, -1, p * p * c)
    m = mae.unpatchify(m.float())  # 1 = masked
    masked = images * (1 - m)
    pasted = images * (1 - m) + recon * m
    rows = [_denorm(masked, mean, std), _denorm(pasted, mean, std), _denorm(images, mean, std)]
    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 4.8), squeeze=False)
    for r, (name, row) in enumerate(zip(("masked", "reconstruction", "original"), rows,
                                        strict=True)):
        for i in range(n):
            _show(axes[r, i], row[i], name if i == 0 else None)
    fig.suptitle(f"MAE reconstructions (mask ratio {mae.mask_ratio:g})")
    return _save(fig, path)
