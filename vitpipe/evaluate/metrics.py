"""Classification metrics on gathered logits: top-k, per-class accuracy, confusion, ECE.

Pure tensor functions (no I/O, no distributed code) so they are tested on synthetic logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits (k capped at C)."""
    if labels.numel() == 0:
        return float("nan")
    k = min(k, logits.shape[-1])
    hit = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return float(hit.float().mean())


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; rows = true class, columns = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall per true class (NaN for a class with no samples)."""
    total = cm.sum(dim=1).double()
    return torch.where(total > 0, cm.diag().double() / total.clamp_min(1), float("nan"))


@dataclass
class Calibration:
    """Reliability-diagram bins and the expected calibration error."""

    ece: float
    edges: list[float]
    confidence: list[float]  # mean confidence per bin (NaN if empty)
    accuracy: list[float]  # accuracy per bin (NaN if empty)
    count: list[int]


def calibration(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> Calibration:
    """ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| over equal-width confidence bins (top-1)."""
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).double()
    conf = conf.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin b holds (edges[b], edges[b+1]]; confidence 0 goes into the first bin
    b = torch.bucketize(conf, edges[1:-1], right=False).clamp(0, n_bins - 1)
    count = torch.bincount(b, minlength=n_bins)
    s_conf = torch.bincount(b, weights=conf, minlength=n_bins)
    s_acc = torch.bincount(b, weights=correct, minlength=n_bins)
    n = max(int(labels.numel()), 1)
    ece = float(((s_acc - s_conf).abs()).sum() / n)
    nz = count.clamp_min(1).double()
    nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
    return Calibration(
        ece=ece,
        edges=edges.tolist(),
        confidence=torch.where(count > 0, s_conf / nz, nan).tolist(),
        accuracy=torch.where(count > 0, s_acc / nz, nan).tolist(),
        count=count.tolist(),
    )


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           split: str, class_names: list[str] | None = None,
                           n_bins: int = 15) -> tuple[dict[str, float], dict]:
    """Scalar metrics named ``<split>_top1/top5/ece/...`` and the details for plots/JSON."""
    logits = logits.float()
    labels = labels.long()
    probs = logits.softmax(dim=-1)
    cm = confusion_matrix(logits.argmax(-1), labels, num_classes)
    pca = per_class_accuracy(cm)
    cal = calibration(probs, labels, n_bins)
    names = class_names or [str(i) for i in range(num_classes)]
    nll = float(torch.nn.functional.cross_entropy(logits, labels)) if labels.numel() else 0.0
    scalars = {
        f"{split}_top1": topk_accuracy(logits, labels, 1),
        f"{split}_top5": topk_accuracy(logits, labels, 5),
        f"{split}_ece": cal.ece,
        f"{split}_nll": nll,
        f"{split}_num_samples": float(labels.numel()),
    }
    for name, acc in zip(names, pca.tolist(), strict=True):
        scalars[f"{split}_acc_{_safe(name)}"] = acc
    details = {
        "confusion_matrix": cm.tolist(),
        "per_class_accuracy": dict(zip(names, pca.tolist(), strict=True)),
        "calibration": cal.__dict__,
        "class_names": names,
    }
    return scalars, details


def _safe(name: str) -> str:
    """MLflow metric names allow alphanumerics, _ - . / and spaces; map the rest to _."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
