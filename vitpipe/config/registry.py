"""Registration stage config: the pyfunc, the registered name and the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel
from .tracking import TrackingConfig


class RegisterConfig(StrictModel):
    """Register a trained run's model and decide whether it becomes ``champion``.

    The gate compares ``metric`` (a metric of the training run, e.g. ``test_top1`` logged by the
    evaluator) with the champion's, on the same test split (tag ``vitpipe.eval_digest``); the
    candidate must improve by more than zero and by at least ``margin``.
    """

    model_name: str = "vitpipe-fmnist"
    run_id: str | None = None  # training run to register; set by the pipeline
    # an evaluation run of the champion on the candidate's test split (set by the pipeline when
    # the splits differ): the gate compares the two on it instead of refusing
    champion_eval_run_id: str | None = None
    metric: str = "test_top1"
    higher_is_better: bool = True
    margin: float = Field(0.0, ge=0)
    digest_mismatch: Literal["refuse", "promote_with_warning"] = "refuse"
    top_k: int = Field(5, ge=1)  # default top-k of the pyfunc (callers may pass params.top_k)
    weights_artifact: str = "weights/model.safetensors"  # or weights/model_ema.safetensors
    onnx: bool = True  # also log the network as ONNX (onnx/model.onnx) beside the pyfunc
    lock_timeout_s: float = Field(60.0, gt=0)  # wait at most this long for the promotion lock
    lock_ttl_s: float = Field(60.0, gt=0)  # a crashed holder's lock is taken over after this
    tracking: TrackingConfig = TrackingConfig()
