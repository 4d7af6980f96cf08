"""Training tasks: one small file per mode, each saying what that mode is.

A task builds its model, computes its loss on a batch, says whether it validates top-1 and
takes MixUp/CutMix and layer-wise lr decay, and writes its weights. The engine asks the task
and never names a mode; ``TASKS`` below is the one place a mode name becomes a task.
Adding a task: a new file with a :class:`~.base.Task` subclass, one entry here, its mode in
``TrainConfig.mode`` (and any section it reads), a test.
"""

from __future__ import annotations

from ...config import ConfigError, TrainConfig
from .base import Task
from .distill import Distill
from .finetune import Finetune
from .mae import MAE
from .supervised import Supervised

TASKS: dict[str, type[Task]] = {t.name: t for t in (Supervised, MAE, Finetune, Distill)}


def task_class(mode: str) -> type[Task]:
    try:
        return TASKS[mode]
    except KeyError:
        raise ConfigError(f"unknown training mode '{mode}'; modes: {sorted(TASKS)}") from None


def get_task(cfg: TrainConfig) -> Task:
    """The task ``cfg.mode`` names, bound to ``cfg``."""
    return task_class(cfg.mode)(cfg)


__all__ = ["TASKS", "Distill", "Finetune", "MAE", "Supervised", "Task", "get_task",
           "task_class"]
