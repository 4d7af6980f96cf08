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

STAGE_NAMES = ("shard", "pretrain", "finetune", "evaluate", "register")
_TARGETS = {
    "pretrain": ("seed", "model", "data", "tracking"),
    "finetune": ("seed", "model", "data", "tracking"),
    "evaluate": ("model", "data", "tracking"),
    "register": ("tracking",),
}


def merge(base: Any, over: Any) -> Any:
    """``over`` laid over ``base``: mappings merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out.get(k), v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


class LaunchConfig(StrictModel):
    """How training stages are launched (``accelerate launch`` arguments).

    ``num_processes`` is per machine (GPUs per node); accelerate receives the total.
    ``max_retries`` is the one retry setting of a training stage: the stage flow retries its
    training task that often, each retry resuming from the newest checkpoint, and with
    deployments the pipeline also resubmits a stage run whose infrastructure crashed that
    often (Prefect retries failed runs, not crashed ones). ``retry_delay_s`` waits between.
    """

    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(None, gt=0, lt=65536)
    cpu: bool = False
    # torch threads per training process where there is no GPU (or cpu=true). None: the
    # host's CPUs / processes per machine, or OMP_NUM_THREADS when set. accelerate alone
    # gives a GPU-less process without --cpu 1 thread (half of a 2-core machine).
    cpu_threads: int | None = Field(None, ge=1)
    max_retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(5.0, ge=0)
    grace_seconds: float = Field(60.0, gt=0)  # SIGTERM -> checkpoint -> exit, before SIGKILL
    # multi-node: a machine that never joins fails the rendezvous after this, not hangs
    rendezvous_timeout_s: int = Field(300, gt=0)

    @model_validator(mode="after")
    def _rank(self) -> LaunchConfig:
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"launch.machine_rank={self.machine_rank} must be < "
                f"launch.num_machines={self.num_machines}"
            )
        return self


class OrchestrationConfig(StrictModel):
    """How the pipeline flow runs its stages: one switch, one code path.

    ``auto``: when the pipeline itself runs from a deployment and the stage deployments
    ``<stage>/<deployment>`` exist, each stage is its own flow run on its work pool
    (``run_deployment``); otherwise stages run in-process as subflows (the embedded default).
    """

    stages: Literal["auto", "subflows", "deployments"] = "auto"
    deployment: str | None = None  # stage deployment name; None: the pipeline's own
    # per-stage deployment names, e.g. {pretrain: kubernetes-multinode}; others: `deployment`
    stage_deployments: dict[str, str] = {}
    job_variables: dict[str, dict[str, Any]] = {}  # per stage, e.g. {finetune: {gpus: 8}}
    poll_seconds: float = Field(2.0, gt=0)
    stage_timeout_seconds: float | None = Field(None, gt=0)
    weights_via: Literal["path", "mlflow"] = "path"  # mlflow: runs:/<id>/weights/<file>
    # Checkpoints under <checkpoint.dir>/<pipeline run id>: retries of this run resume from
    # them, the next (e.g. weekly) run starts fresh instead of resuming a finished training.
    scope_checkpoints: bool = True

    @model_validator(mode="after")
    def _stages(self) -> OrchestrationConfig:
        for field in ("job_variables", "stage_deployments"):
            unknown = set(getattr(self, field)) - set(STAGE_NAMES)
            if unknown:
                raise ValueError(
                    f"orchestration.{field} has unknown stage(s) {sorted(unknown)}; "
                    f"stages are {list(STAGE_NAMES)}"
                )
        return self


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
    orchestration: OrchestrationConfig = OrchestrationConfig()

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
            data[stage] = merge(inherited, data[stage])
        return data
