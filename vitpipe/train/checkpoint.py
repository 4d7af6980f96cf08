"""Atomic, rotating checkpoints on local disk or s3://, and exact-resume verification.

Layout: ``<dir>/step_000000120/`` holding Accelerate's ``save_state`` files (model, optimizer,
scaler, per-rank RNG), ``ema.safetensors``, ``vitpipe_state.json`` (step, epoch, data cursor,
MLflow run id), one ``rng_check_<rank>.json`` per rank and, written last, ``COMPLETE``.

* local: everything is written into ``.tmp-step_*`` and renamed into place (atomic on POSIX);
  a multi-node run needs ``dir`` on a shared filesystem (or s3://).
* s3://: written to a local staging dir, every rank uploads its own RNG files, the main process
  the rest, and the ``COMPLETE`` marker goes up last -- a prefix without it is ignored.

Pitfall (accelerate #4283): ``load_state`` only logs at INFO when RNG restore fails, so after
loading we compare an RNG fingerprint and the step counters and stop loudly on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..weights import check_architecture
from . import remote

STATE_FILE = "vitpipe_state.json"
MARKER = "COMPLETE"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def rng_fingerprint() -> str:
    """sha256 over python, numpy, torch CPU (and CUDA) RNG states of this process."""
    h = hashlib.sha256()
    h.update(repr(random.getstate()).encode())
    st = np.random.get_state()
    h.update(np.asarray(st[1]).tobytes() + repr(st[2:]).encode())
    h.update(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for s in torch.cuda.get_rng_state_all():
            h.update(s.numpy().tobytes())
    return h.hexdigest()


class CheckpointManager:
    """Save/rotate/find/load checkpoints for one run. Every rank calls ``save``/``load``."""

    def __init__(self, accelerator, root: str, keep_last: int, staging: str | Path,
                 s3: Any = None) -> None:
        self.acc = accelerator
        self.root = root.rstrip("/")
        self.keep_last = keep_last
        self.staging = Path(staging)
        self.s3 = s3
        self.remote = remote.is_remote(self.root)
        self.last_saved: str | None = None

    # ----------------------------------------------------------------- discovery
    def complete(self) -> list[tuple[int, str]]:
        """``(step, uri)`` of every complete checkpoint under ``root``, oldest first."""
        if self.remote:
            names = remote.list_dirs(self.root, self.s3)
            out = [(int(m.group(1)), f"{self.root}/{n}") for n in names
                   if (m := _STEP_RE.match(n))]
            return sorted(s for s in out if remote.exists(f"{s[1]}/{MARKER}", self.s3))
        root = Path(self.root)
        if not root.is_dir():
            return []
        out = []
        for d in root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and (d / MARKER).is_file():
                out.append((int(m.group(1)), str(d)))
        return sorted(out)

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1][1] if done else None

    # ----------------------------------------------------------------- save
    def save(self, step: int, state: dict[str, Any], ema: Any = None) -> str:
        """Write a checkpoint for ``step``; returns its URI. Collective: call on every rank."""
        acc = self.acc
        name = step_name(step)
        if self.remote:
            tmp, final = self.staging / name, f"{self.root}/{name}"
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            tmp, final = Path(self.root) / f".tmp-{name}", str(Path(self.root) / name)
        if acc.is_local_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        rank = acc.process_index
        (tmp / f"rng_check_{rank}.json").write_text(json.dumps({"rank": rank,
                                                                "rng": rng_fingerprint()}))
        if acc.is_main_process:
            from safetensors.torch import save_file

            if ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                          str(tmp / EMA_FILE))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        acc.wait_for_everyone()
        if self.remote:
            own = {f"random_states_{rank}.pkl", f"rng_check_{rank}.json"}
            for f in sorted(tmp.iterdir()):
                mine = f.name in own
                other_rank = re.match(r"^(random_states|rng_check)_\d+\.", f.name) and not mine
                if mine or (acc.is_main_process and not other_rank and f.name != MARKER):
                    remote.upload(f, f"{final}/{f.name}", self.s3)
            acc.wait_for_everyone()
            if acc.is_main_process:
                marker = tmp / MARKER
                marker.write_text(json.dumps({"step": step, "time": time.time()}))
                remote.upload(marker, f"{final}/{MARKER}", self.s3)
        elif acc.is_main_process:
            marker = tmp / MARKER
            marker.write_text(json.dumps({"step": step, "time": time.time()}))
            _fsync_dir(tmp)
            if Path(final).exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(Path(self.root))
        if acc.is_main_process:
            self.rotate()
        if self.remote and acc.is_local_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_saved = final
        return final

    def rotate(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop older ones and stale tmps."""
        done = self.complete()
        for _, uri in done[: max(0, len(done) - self.keep_last)]:
            if self.remote:
                remote.delete_prefix(uri, self.s3)
            else:
                shutil.rmtree(uri, ignore_errors=True)
        if not self.remote:
            newest = done[-1][0] if done else -1
            for d in Path(self.root).glob(".tmp-step_*"):
                m = re.match(r"^\.tmp-step_(\d+)$", d.name)
                if m and int(m.group(1)) < newest:
                    shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------------- load
    def resolve(self, resume: str | None) -> str | None:
        """The checkpoint URI to resume from: ``auto`` -> newest complete (or None)."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        return resume.rstrip("/")

    def fetch(self, uri: str) -> Path:
        """A local directory holding checkpoint ``uri`` (downloaded when remote); checked."""
        if remote.is_remote(uri):
            local = self.staging / f"resume-{Path(uri).name}"
            if self.acc.is_local_main_process:
                if not remote.exists(f"{uri}/{MARKER}", self.s3):
                    raise CheckpointError(f"checkpoint {uri} is incomplete (no {MARKER} marker)")
                shutil.rmtree(local, ignore_errors=True)
                remote.download_prefix(uri, local, self.s3)
            self.acc.wait_for_everyone()
        else:
            local = Path(uri)
        if not local.is_dir():
            raise CheckpointError(f"checkpoint {uri} does not exist (checkpoint.resume / --resume)")
        if not (local / MARKER).is_file():
            raise CheckpointError(f"checkpoint {uri} is incomplete (no {MARKER} marker); "
                                  "it was interrupted while being written")
        return local

    def load(self, uri: str, model: torch.nn.Module, ema: Any = None) -> dict[str, Any]:
        """Restore everything from ``uri`` and verify step and RNG; returns the saved state."""
        local = self.fetch(uri)
        model_file = local / MODEL_FILE
        if not model_file.is_file():
            raise CheckpointError(f"checkpoint {uri} has no {MODEL_FILE}")
        check_architecture(model_file, model, uri)
        state = json.loads((local / STATE_FILE).read_text())
        rank = self.acc.process_index
        check_file = local / f"rng_check_{rank}.json"
        if not check_file.is_file():
            raise CheckpointError(
                f"checkpoint {uri} has no RNG state for rank {rank}: it was written by "
                f"{state.get('world_size')} processes, this run has {self.acc.num_processes}"
            )
        self.acc.load_state(str(local))
        if ema is not None:
            from safetensors.torch import load_file

            if not (local / EMA_FILE).is_file():
                raise CheckpointError(f"checkpoint {uri} has no {EMA_FILE} but train.ema_decay "
                                      "is set; resume without EMA or start fresh")
            ema.load_state_dict(load_file(str(local / EMA_FILE), device="cpu"))
        expected = json.loads(check_file.read_text())["rng"]
        if rng_fingerprint() != expected:
            raise CheckpointError(
                f"rank {rank}: RNG state after loading {uri} differs from the saved one "
                "(accelerate failed to restore random states); refusing an inexact resume"
            )
        micro = int(state["step"]) * int(state["accum_steps"])
        if int(self.acc.step) != micro:
            raise CheckpointError(
                f"rank {rank}: accelerator step after loading {uri} is {self.acc.step}, "
                f"expected {micro} (= step {state['step']} x accum {state['accum_steps']})"
            )
        return state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
