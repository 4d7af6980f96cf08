"""Fine-tuning: a classifier started from ``init`` (an MAE encoder, a supervised run, timm
weights); position tables are resampled and a head of another class count re-initialised."""

from __future__ import annotations

import torch

from .base import Setup, Task


class Finetune(Task):
    name = "finetune"

    def setup(self, model: torch.nn.Module, ctx: Setup) -> str:
        from ..pretrained import load_init

        report = load_init(model, self.cfg.init, ctx.out_dir / ".init_cache",
                           self.cfg.data.s3, ctx.tracking_uri)
        return f"fine-tune init from {self.cfg.init}: {report}"
