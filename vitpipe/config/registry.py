"""Registration stage config: the pyfunc, the registered name and the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel
from .tracking import TrackingConfig


class RegisterConfig(StrictModel):
    """Register a trained run's model and decide whether it becomes ``champion``."""

    model_name: str = "vitpipe-fmnist"
    run_id: str | None = None  # training run to register; set by the pipeline
    metric: str = "test_top1"
    higher_is_better: bool = True
    margin: float = Field(0.0, ge=0)
    digest_mismatch: Literal["refuse", "promote_with_warning"] = "refuse"
    top_k: int = Field(5, ge=1)
    tracking: TrackingConfig = TrackingConfig()
