"""Pipeline config: the stages in order, with shared sections written once.

A preset YAML states ``seed``, ``model``, ``data`` and ``tracking`` once at the top level; they
are merged (stage values win) into ``pretrain``, ``finetune``, ``evaluate`` and ``register``
before validation, so every stage still receives one complete, typed config.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .data import DataConfig, ShardConfig
from .evaluate import EvaluateConfig
from .model import ModelConfig
from .registry import RegisterConfig
from .tracking import TrackingConfig
from .train import TrainConfig

SHARED = ("seed", "model", "data", "tracking")
_TARGETS = {
    "pretrain": ("seed", "model", "data", "tracking"),
    "finetune": ("seed", "model", "data", "tracking"),
    "evaluate": ("model", "data", "tracking"),
    "register": ("tracking",),
}


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = _merge(out.get(k), v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


class LaunchConfig(StrictModel):
    """How training stages are launched (``accelerate launch`` arguments)."""

    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(None, gt=0, lt=65536)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False
    max_retries: int = Field(2, ge=0)


class PipelineConfig(StrictModel):
    """shard -> [pretrain] -> finetune -> evaluate -> register."""

    name: str = "vitpipe"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()
    shard: ShardConfig = ShardConfig()
    pretrain: TrainConfig | None = None
    finetune: TrainConfig = TrainConfig(mode="supervised")
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    launch: LaunchConfig = LaunchConfig()
    work_dir: str = "runs"

    @model_validator(mode="before")
    @classmethod
    def _inherit_shared(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for stage, keys in _TARGETS.items():
            if stage not in data or data[stage] is None:
                if stage == "pretrain":
                    continue
                data[stage] = {}
            if not isinstance(data[stage], dict):
                continue
            inherited = {k: data[k] for k in keys if k in data}
            data[stage] = _merge(inherited, data[stage])
        return data
