"""Evaluation stage config."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel
from .data import DataConfig
from .model import ModelConfig
from .tracking import TrackingConfig


class EvaluateConfig(StrictModel):
    """Evaluate trained weights on a split; write plots + metrics.json; log to MLflow."""

    weights: str | None = None  # safetensors path/URI or runs:/<id>/<path>; set by pipeline
    run_id: str | None = None  # MLflow run to log into (the training run by default)
    use_ema: bool = False  # with only run_id: evaluate weights/model_ema.safetensors
    split: str = "test"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/eval"
    num_attention_images: int = Field(8, ge=0)
    ece_bins: int = Field(15, gt=1)
