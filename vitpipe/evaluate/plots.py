"""The plots live in :mod:`vitpipe.plots` (training draws MAE reconstructions too, and
``vitpipe.train`` must not import ``vitpipe.evaluate``); re-exported here."""

from ..plots import (
    plot_attention,
    plot_confusion,
    plot_mae_reconstructions,
    plot_reliability,
    plot_training_curves,
)

__all__ = ["plot_attention", "plot_confusion", "plot_mae_reconstructions", "plot_reliability",
           "plot_training_curves"]
