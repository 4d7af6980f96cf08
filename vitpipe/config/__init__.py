"""Typed configuration: one pydantic model per stage, YAML presets + dotted overrides."""

from .base import (
    ConfigError,
    StrictModel,
    apply_overrides,
    flatten,
    json_schema,
    load,
    read_yaml,
    validate,
)
from .data import AugmentConfig, DataConfig, S3Config, ShardConfig, SourceConfig
from .evaluate import EvaluateConfig
from .model import MAEConfig, ModelConfig
from .pipeline import LaunchConfig, PipelineConfig
from .registry import RegisterConfig
from .tracking import TrackingConfig
from .train import CheckpointConfig, OptimConfig, TrainConfig

STAGES = {
    "shard": ShardConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "register": RegisterConfig,
    "pipeline": PipelineConfig,
}

__all__ = [
    "STAGES",
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "LaunchConfig",
    "MAEConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "RegisterConfig",
    "S3Config",
    "ShardConfig",
    "SourceConfig",
    "StrictModel",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "flatten",
    "json_schema",
    "load",
    "load_stage",
    "read_yaml",
    "validate",
]


def load_stage(stage: str, path: str | None = None, overrides: list[str] | None = None,
               section: str | None = None):
    """Load one stage's config from a stage YAML or from a pipeline preset's ``section``.

    ``vitpipe train --config configs/fmnist_cpu.yaml --mode mae`` reads the pipeline preset,
    takes its ``pretrain`` section (with shared keys merged in), then applies the overrides.
    """
    model = STAGES[stage]
    data = read_yaml(path) if path else {}
    src = str(path) if path else "defaults"
    if section and stage != "pipeline" and _looks_like_pipeline(data):
        pipe = validate(PipelineConfig, data, src)
        part = getattr(pipe, section)
        if part is None:
            raise ConfigError(f"{src} has no '{section}' section")
        data = part.model_dump(mode="json")
        src = f"{src} [{section}]"
    data = apply_overrides(data, overrides or [])
    if overrides:
        src += " + overrides"
    return validate(model, data, src)


def _looks_like_pipeline(data: dict) -> bool:
    return any(k in data for k in ("shard", "pretrain", "finetune", "register", "launch"))
