"""Training stage config: one typed object for supervised, MAE and fine-tune runs.

Batch semantics (validated at launch, when the world size is known):
``data.batch_size`` is the micro-batch of one process for one forward pass. The effective
(optimizer-step) batch is ``data.batch_size * train.accum_steps * world_size``. Alternatively
``train.global_batch_size`` fixes the effective batch; it must then be divisible by
``accum_steps * world_size`` and replaces ``data.batch_size``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictModel
from .data import DataConfig
from .model import MAEConfig, ModelConfig
from .tracking import TrackingConfig


class OptimConfig(StrictModel):
    """The recipe. ``lr`` wins over ``blr``; else lr = blr * effective_batch / 256."""

    epochs: float = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0)  # cap, for tests and smoke runs
    blr: float = Field(1e-3, gt=0)
    lr: float | None = Field(None, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    accum_steps: int = Field(1, ge=1)
    global_batch_size: int | None = Field(None, gt=0)  # see module docstring
    clip_grad: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    layer_decay: float | None = Field(None, gt=0, le=1)  # LLRD, for fine-tuning
    ema_decay: float | None = Field(None, gt=0, lt=1)
    use_ema_for_export: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads (CPU)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("train.betas must both be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _ema_export(self) -> OptimConfig:
        if self.use_ema_for_export and self.ema_decay is None:
            raise ValueError("train.use_ema_for_export needs train.ema_decay")
        return self


class CheckpointConfig(StrictModel):
    """Where and how often to checkpoint. ``dir`` may be local or s3://."""

    dir: str = "runs/checkpoints"
    every_n_steps: int = Field(500, gt=0)
    keep_last: int = Field(2, ge=1)
    resume: str | None = "auto"  # "auto": newest in dir; a path/URI; None/"none": start fresh

    @field_validator("resume")
    @classmethod
    def _none(cls, v: str | None) -> str | None:
        return None if v is None or v.strip().lower() in ("", "none", "null", "false") else v


class DistConfig(StrictModel):
    """Distributed safety nets: no collective may hang forever (multi-node pitfall)."""

    timeout_s: float = Field(600.0, gt=0)  # process-group timeout: a dead/stuck peer -> error
    preflight_timeout_s: float = Field(60.0, gt=0)  # first all-reduce must finish within this


class DistillConfig(StrictModel):
    """The ``distill`` task: a frozen teacher classifier's hard labels (DeiT)."""

    # teacher weights: a path, s3://, runs:/<id>/weights/model.safetensors, models:/<name>@<alias>
    teacher: str | None = None
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the teacher's labels; 1 - alpha: true labels


# What each mode cannot run without (checked at load, before any launch).
NEEDS = {"finetune": ("init", "an encoder or checkpoint URI"),
         "distill": ("distill.teacher", "the teacher's weights URI")}


class TrainConfig(StrictModel):
    """Everything one training run needs; logged flat to MLflow as params."""

    mode: Literal["supervised", "mae", "finetune", "distill"] = "supervised"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    mae: MAEConfig = MAEConfig()
    distill: DistillConfig = DistillConfig()
    data: DataConfig = DataConfig()
    train: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    dist: DistConfig = DistConfig()
    init: str | None = None  # finetune source: path, s3://, or runs:/<id>/<path>
    output_dir: str = "runs/train"
    eval_every_epochs: float = Field(1.0, gt=0)
    log_every_n_steps: int = Field(10, gt=0)
    progress: bool = True  # tqdm bar on the main process

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        key, what = NEEDS.get(self.mode, (None, None))
        if key and not _get(self, key):
            raise ValueError(f"mode={self.mode} needs '{key}' ({what})")
        return self

    def as_stage(self, stage: str) -> TrainConfig:
        """This config run as pipeline stage ``stage``: its MLflow run is named
        ``<stage>/<task>`` (e.g. ``pretrain/mae``) unless ``tracking.run_name`` is set, so the
        pipeline's stages and tasks read the same in the config, CLI, flows and MLflow."""
        if self.tracking.run_name:
            return self
        tracking = self.tracking.model_copy(update={"run_name": f"{stage}/{self.mode}"})
        return self.model_copy(update={"tracking": tracking})


def _get(cfg: StrictModel, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
