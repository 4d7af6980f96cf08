"""MAE self-supervised pretraining: the encoder sees only the visible patches; the loss is
the decoder's pixel reconstruction of the masked ones. No labels, no validation top-1, no
MixUp, no layer decay; it writes the encoder (``encoder.safetensors``) and a reconstruction
figure."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Task


class MAE(Task):
    name = "mae"
    classifier = False
    pretraining = True
    plots = ("plots/mae_reconstructions.png",)

    def build_model(self, num_classes: int) -> torch.nn.Module:
        from ...models import build_mae

        return build_mae(self.cfg.model, self.cfg.mae)

    def image_size(self, model: torch.nn.Module) -> int:
        return self.cfg.data.augment.img_size or model.encoder.img_size

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x)[0]

    def export(self, acc, model, ema, out_dir: Path, tracker, manifest) -> Path:
        from ..artifacts import export_encoder

        return export_encoder(self.cfg, acc, model, ema, out_dir, tracker, manifest)
