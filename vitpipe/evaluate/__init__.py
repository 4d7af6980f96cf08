"""Evaluation stage: metrics, plots and ``metrics.json`` for trained weights on one split.

``evaluate(cfg)`` runs under plain Python or ``accelerate launch``: every rank scores its part
of the (padded) split, ``gather_for_metrics`` collects logits and labels, padding (label < 0) is
dropped, so each sample counts exactly once. The main process writes plots and logs into the
training run (``cfg.run_id``).
"""

from __future__ import annotations

from .metrics import calibration, classification_metrics, confusion_matrix, topk_accuracy
from .run import evaluate

__all__ = ["calibration", "classification_metrics", "confusion_matrix", "evaluate",
           "topk_accuracy"]
