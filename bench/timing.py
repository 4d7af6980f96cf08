"""Step timing shared by the bench scripts (run as ``python bench/<name>.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_steps(step: Callable[[], None], n: int, device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per step over ``n`` steps; CUDA is synchronised so queued kernels count."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) / n
