"""Accelerator construction and the distributed safety nets.

* every collective has a bounded timeout (``InitProcessGroupKwargs``), so a dead or stuck peer
  turns into an error instead of a hang;
* a short all-reduce *preflight* runs before any expensive work (multi-node hangs at the first
  collective, accelerate #412/#806);
* SIGTERM sets a flag that all ranks agree on at the next step, so every rank checkpoints the
  same step and exits (Prefect/Kubernetes kill pods with SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from ..config import ConfigError, TrainConfig
from ..errors import TrainingError, VitpipeError
from ..weights import strip_wrapper_prefix


def make_accelerator(cfg: TrainConfig):
    """Accelerator with mixed precision, grad accumulation and a bounded process-group timeout."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (no loss scaler on CPU); "
                          "use bf16 or no on CPU")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        backend = "gloo"
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched: bound every collective
        handlers.append(InitProcessGroupKwargs(backend=backend,
                                               timeout=timedelta(seconds=cfg.dist.timeout_s)))
    try:
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.accum_steps,
            kwargs_handlers=handlers,
            cpu=not torch.cuda.is_available(),
            dynamo_backend="inductor" if cfg.train.compile else None,
        )
    except (RuntimeError, ValueError) as err:
        raise TrainingError(f"could not start the distributed run: {err}") from None


def preflight(accelerator, timeout_s: float) -> None:
    """All-reduce one tensor within ``timeout_s`` or raise; catches unreachable peers early."""
    n = accelerator.num_processes
    if n == 1:
        return
    out: dict[str, Any] = {}

    def _run() -> None:
        try:
            t = torch.ones(1, device=accelerator.device)
            out["sum"] = float(accelerator.reduce(t, reduction="sum").item())
        except Exception as err:  # noqa: BLE001 - reported below
            out["err"] = err

    th = threading.Thread(target=_run, name="vitpipe-preflight", daemon=True)
    th.start()
    th.join(timeout_s)
    rank = accelerator.process_index
    if th.is_alive():
        raise TrainingError(
            f"rank {rank}: preflight all-reduce over {n} processes did not finish in "
            f"{timeout_s:g}s; a peer is missing or unreachable (check every machine was launched, "
            "main_process_ip/port and firewalls; dist.preflight_timeout_s)"
        )
    if "err" in out:
        raise TrainingError(f"rank {rank}: preflight all-reduce failed: {out['err']}") from None
    if int(out["sum"]) != n:
        raise TrainingError(f"rank {rank}: preflight all-reduce gave {out['sum']}, expected {n}")


def is_collective_failure(err: BaseException) -> bool:
    """Errors that mean a peer died or a collective timed out (gloo/nccl)."""
    name = type(err).__name__
    text = str(err).lower()
    return name in ("DistBackendError", "DistNetworkError", "DistError") or any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset",
                            "timed out", "timeout", "broken pipe", "peer")
    )


class StopFlag:
    """SIGTERM/SIGINT -> flag; ``should_stop`` agrees across ranks (max all-reduce)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM,):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def should_stop(self, accelerator) -> bool:
        local = 1.0 if self.signum is not None else 0.0
        if accelerator.num_processes == 1:
            return bool(local)
        t = torch.tensor([local], device=accelerator.device)
        return bool(accelerator.reduce(t, reduction="max").item() > 0)


def fault_injection(step: int, rank: int) -> None:
    """Test hook: ``VITPIPE_FAULT_KILL_AT_STEP=k`` (and optional ``VITPIPE_FAULT_RANK=r``)
    makes rank r (default: every rank) SIGKILL itself right after optimizer step k. With
    ``VITPIPE_FAULT_ONCE=path`` it fires only while that file does not exist (it creates it),
    so a retry that resumes before step k gets past it."""
    at = os.environ.get("VITPIPE_FAULT_KILL_AT_STEP")
    if not at or int(at) != step:
        return
    who = os.environ.get("VITPIPE_FAULT_RANK")
    if who is not None and int(who) != rank:
        return
    once = os.environ.get("VITPIPE_FAULT_ONCE")
    if once:
        try:
            with open(once, "x"):
                pass
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def all_ok(acc, fn: Callable[[], Any]) -> Any:
    """Run a setup step on every rank; if any rank fails, every rank stops with an error."""
    err: BaseException | None = None
    out = None
    try:
        out = fn()
    except (VitpipeError, ValueError, TypeError, OSError) as e:
        err = e
    if acc.num_processes > 1:
        flag = torch.tensor([0.0 if err is None else 1.0], device=acc.device)
        failed = acc.reduce(flag, reduction="max").item() > 0
        if failed and err is None:
            raise TrainingError(f"rank {acc.process_index}: another rank failed during setup "
                                "(its error is in that rank's log)")
    if err is not None:
        raise err
    return out


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes (fp32, CPU), in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(strip_wrapper_prefix(name).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_replicas(acc, model, steps: int) -> None:
    """Every rank reports its steps and parameter digest; diverged replicas are an error."""
    from accelerate.utils import gather_object

    mine = (acc.process_index, steps, param_digest(acc.unwrap_model(model)))
    reports = gather_object([mine]) if acc.num_processes > 1 else [mine]
    for r, n, d in reports:
        acc.print(f"rank {r}/{acc.num_processes}: {n} steps, param digest {d[:16]}")
    if len({(n, d) for _, n, d in reports}) != 1:
        raise TrainingError(f"replicas diverged at the end of training: {reports}")
