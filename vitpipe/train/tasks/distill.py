"""Knowledge distillation from a frozen teacher classifier, DeiT's hard-label variant
(Touvron et al. 2021, "Training data-efficient image transformers", sec. 5.1).

The student's class-token logits are trained on ``(1 - alpha) * CE(y) + alpha * CE(argmax
teacher)``. Hard labels, because DeiT found them better than soft (KL) distillation for ViT
students; on the class token rather than a separate distillation token, because the student
then stays a plain ViT that evaluation, the registry and the pyfunc take unchanged (DeiT's
extra token gains it +0.3-0.4% on ImageNet at the cost of a second head). The teacher sees the
same (MixUp/CutMix-mixed) images as the student, runs in inference mode under the same
autocast, and is never in a checkpoint: a resumed run loads it again from ``distill.teacher``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import ModelConfig
from ...errors import CheckpointError
from .base import Setup, Task


class Distill(Task):
    name = "distill"

    def setup(self, model: torch.nn.Module, ctx: Setup) -> str:
        from ...models import build_from_config
        from ...weights import (
            fetch_weights,
            load_classifier_weights,
            saved_architecture,
            weights_file,
        )

        uri = self.cfg.distill.teacher
        local = weights_file(fetch_weights(uri, ctx.out_dir / ".teacher_cache",
                                           self.cfg.data.s3, ctx.tracking_uri), f"teacher {uri}")
        saved = saved_architecture(local)
        if saved is None:
            raise CheckpointError(f"teacher {uri}: {local.name} has no vitpipe model metadata "
                                  "(write it with vitpipe train, or register it)")
        arch, classes = ModelConfig.model_validate_json(saved[0]), saved[1]
        if classes != model.num_classes:
            raise CheckpointError(f"teacher {uri} predicts {classes} classes; the manifest has "
                                  f"{model.num_classes}")
        teacher = build_from_config(arch.model_copy(update={"num_classes": classes}))
        load_classifier_weights(teacher, local, f"teacher {uri}")  # the one strict load
        self.teacher = teacher.eval().requires_grad_(False).to(ctx.acc.device)
        self.acc = ctx.acc
        n = sum(p.numel() for p in teacher.parameters())
        return f"distilling from teacher {uri}: {arch.name} depth {teacher.depth}, {n:,} params"

    def teacher_labels(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.acc.autocast():
            labels = self.teacher(x).argmax(-1)
        return labels.clone()  # outside inference mode: a normal tensor autograd may save

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            x, y = self.mix(x, y)
        hard = self.teacher_labels(x)
        out = model(x).float()
        alpha = self.cfg.distill.alpha
        own = F.cross_entropy(out, y, label_smoothing=self.cfg.train.label_smoothing)
        return (1 - alpha) * own + alpha * F.cross_entropy(out, hard)
