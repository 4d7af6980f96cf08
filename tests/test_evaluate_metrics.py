"""Metrics on synthetic logits with known answers, and the plots they feed."""

from __future__ import annotations

import json

import pytest
import torch

from vitpipe.evaluate import plots
from vitpipe.evaluate.metrics import (
    calibration,
    classification_metrics,
    confusion_matrix,
    per_class_accuracy,
    topk_accuracy,
)


def test_topk_and_confusion():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 0, 1])
    assert topk_accuracy(logits, labels, 1) == 0.25
    assert topk_accuracy(logits, labels, 2) == 0.5
    assert topk_accuracy(logits, labels, 5) == 1.0  # capped at C
    cm = confusion_matrix(logits.argmax(-1), labels, 3)
    assert cm.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]
    pca = per_class_accuracy(cm)
    assert pca.tolist() == [0.5, 0.0, 0.0]
    empty = per_class_accuracy(confusion_matrix(torch.tensor([0]), torch.tensor([0]), 2))
    assert empty[0] == 1.0 and torch.isnan(empty[1])


def test_ece_by_hand():
    # two samples at confidence 0.9 (one right), two at 0.6 (both right), 15 bins
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    cal = calibration(probs, labels, n_bins=10)
    # bin (0.8, 0.9]: acc 0.5 conf 0.9 ; bin (0.5, 0.6]: acc 1.0 conf 0.6
    assert cal.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert sum(cal.count) == 4
    perfect = calibration(torch.eye(3), torch.arange(3), 15)
    assert perfect.ece == pytest.approx(0.0)


def test_ece_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g) * 3
    labels = torch.randint(0, 10, (500,), generator=g)
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    ref = 0.0
    edges = torch.linspace(0, 1, 16)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ref += m.float().mean() * ((pred[m] == labels[m]).float().mean() - conf[m].mean()).abs()
    assert calibration(probs, labels, 15).ece == pytest.approx(float(ref), abs=1e-6)


def test_classification_metrics_and_plots(tmp_path):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (200,), generator=g)
    logits = torch.randn(200, 4, generator=g) + 3 * torch.nn.functional.one_hot(labels, 4)
    names = ["a", "b c", "d", "e"]
    scalars, details = classification_metrics(logits, labels, 4, "test", names, 10)
    assert scalars["test_top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean())
    assert scalars["test_top5"] == 1.0
    assert 0 <= scalars["test_ece"] <= 1
    assert "test_acc_b_c" in scalars
    assert sum(map(sum, details["confusion_matrix"])) == 200
    json.dumps(details)
    p1 = plots.plot_confusion(details["confusion_matrix"], names, tmp_path / "cm.png")
    p2 = plots.plot_reliability(details["calibration"], tmp_path / "rel.png")
    p3 = plots.plot_training_curves({"loss": [(1, 2.0), (2, 1.0)], "lr": [(1, 1e-3)]},
                                    tmp_path / "curves.png")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
