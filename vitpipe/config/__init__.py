"""Typed configuration: one pydantic model per stage, YAML presets + dotted overrides."""

import sys

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
from .pipeline import LaunchConfig, PipelineConfig, merge
from .registry import RegisterConfig
from .score import ScoreConfig
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
    "ScoreConfig",
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


# Which pipeline section a stage command reads when no --section is given.
DEFAULT_SECTION = {"shard": "shard", "train": "finetune", "evaluate": "evaluate",
                   "register": "register"}
TRAIN_SECTIONS = ("pretrain", "finetune")


def load_stage(stage: str, path: str | None = None, overrides: list[str] | None = None,
               section: str | None = None, layer: dict | None = None):
    """Load one stage's config from a stage YAML or from a pipeline preset's ``section``.

    ``vitpipe train --config configs/fmnist_cpu.yaml --mode mae`` reads the pipeline preset,
    takes its ``pretrain`` section (with shared keys merged in), then applies the overrides.

    One key vocabulary for every command: an override is either the stage's own key
    (``weights=...``) or its full pipeline key (``evaluate.weights=...``; for training
    ``finetune.train.epochs=...`` or ``pretrain...``). Other pipeline keys
    (``launch.num_processes=2`` given to ``vitpipe evaluate``) are checked against the pipeline
    schema and reported as not used by this stage, so one list of overrides fits every command.
    With a pipeline preset, a training or evaluation stage whose ``data.manifest`` is unset
    reads the manifest the preset's shard stage writes (``<shard.output>/manifest.json``).
    ``layer`` (e.g. what a training run recorded) lies over the file's values, under the
    overrides.
    """
    model = STAGES[stage]
    if stage == "pipeline":
        return load(model, path, overrides)
    section = section or DEFAULT_SECTION[stage]
    sections = TRAIN_SECTIONS if stage == "train" else (DEFAULT_SECTION[stage],)
    if section not in sections:
        raise ConfigError(f"vitpipe {stage} reads section(s) {list(sections)} of a pipeline "
                          f"preset, not '{section}'")
    data = read_yaml(path) if path else {}
    src = str(path) if path else "defaults"
    own, other = _scope(model, section, overrides or [])
    preset = _looks_like_pipeline(data)
    if preset or other:
        pipe = validate(PipelineConfig, apply_overrides(data if preset else {}, other),
                        src + (" + overrides" if other else ""))
        if other:
            _note(f"vitpipe {stage}: not used by the {section} stage (pipeline keys of other "
                  f"stages): {', '.join(o.split('=', 1)[0] for o in other)}")
    if preset:
        part = getattr(pipe, section)
        if part is None:
            raise ConfigError(f"{src} has no '{section}' section")
        data = part.model_dump(mode="json")
        if stage in ("train", "evaluate") and not data["data"].get("manifest"):
            data["data"]["manifest"] = f"{pipe.shard.output.rstrip('/')}/manifest.json"
        src = f"{src} [{section}]"
    if layer:
        data = merge(data, layer)
    data = apply_overrides(data, own)
    if own:
        src += " + overrides"
    try:
        return validate(model, data, src)
    except ConfigError as err:
        if "(section: top level)" not in str(err):
            raise
        raise ConfigError(f"{err}\nvitpipe {stage} takes its own keys short (key=value) or in "
                          f"full ({section}.key=value), and any pipeline key (see `vitpipe "
                          f"config flat --config <preset>`)") from None


def _scope(model, section: str, overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split overrides into this stage's own (prefix ``<section>.`` dropped) and the rest."""
    own, other = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        head, _, rest = key.partition(".")
        if head == section and head not in model.model_fields and rest:
            own.append(item.strip()[len(section) + 1:])
        elif head in model.model_fields or head not in PipelineConfig.model_fields:
            own.append(item)  # a short key, or an unknown one the stage's schema will name
        else:
            other.append(item)
    return own, other


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _looks_like_pipeline(data: dict) -> bool:
    return any(k in data for k in ("shard", "pretrain", "finetune", "register", "launch"))
