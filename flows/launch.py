"""``accelerate launch`` as a child process of a training flow.

The flow process never imports torch: it writes the resolved :class:`TrainConfig` to a file,
starts ``accelerate launch -m vitpipe.cli train --config <file> --result-file <file>`` in its
own process group, streams every output line into the flow run's logs, and reads the outcome
from the result file (:mod:`vitpipe.train.result_file`), never from stdout: a non-zero exit
becomes a :class:`TrainingError` that quotes the error the failing rank recorded itself. When
the flow process is told to stop (Prefect cancellation raises in the main thread, SIGTERM,
Ctrl-C) it forwards SIGTERM to the whole child tree so the trainer can checkpoint within
``grace`` seconds (SIGTERM kills before ``on_cancellation`` hooks run: prefect #7766, #17623),
then SIGKILLs what is left.

Multi-node (Kubernetes indexed Job): rank 0 runs the flow; every other pod runs
``python -m flows.launch follow``, which reads the same flow run's parameters from the Prefect
API and joins the rendezvous with ``machine_rank`` from ``JOB_COMPLETION_INDEX``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitpipe.config import LaunchConfig, TrainConfig
from vitpipe.errors import TrainingError
from vitpipe.train.result_file import read_errors, read_result

TAIL_LINES = 40


def launch_env_overrides(launch: LaunchConfig,
                         environ: dict[str, str] | None = None) -> LaunchConfig:
    """Fill per-machine fields from the environment (set by the multi-node job template).

    ``VITPIPE_MACHINE_RANK``, ``VITPIPE_MAIN_PROCESS_IP``, ``VITPIPE_MAIN_PROCESS_PORT`` and
    ``VITPIPE_NUM_MACHINES`` win over the config, because only the pod knows its own index;
    in an indexed Job (``VITPIPE_MULTINODE=1``) the rank is ``JOB_COMPLETION_INDEX``.
    """
    env = os.environ if environ is None else environ
    upd: dict[str, Any] = {}
    if env.get("VITPIPE_MULTINODE") == "1" and env.get("JOB_COMPLETION_INDEX"):
        upd["machine_rank"] = int(env["JOB_COMPLETION_INDEX"])  # Kubernetes indexed Job
    for key, field in (("VITPIPE_MACHINE_RANK", "machine_rank"),
                       ("VITPIPE_NUM_MACHINES", "num_machines"),
                       ("VITPIPE_MAIN_PROCESS_PORT", "main_process_port")):
        if env.get(key):
            upd[field] = int(env[key])
    if env.get("VITPIPE_MAIN_PROCESS_IP"):
        upd["main_process_ip"] = env["VITPIPE_MAIN_PROCESS_IP"]
    return launch.model_validate({**launch.model_dump(), **upd}) if upd else launch


def cpu_threads(launch: LaunchConfig, env: dict[str, str] | None = None,
                cuda: bool | None = None) -> int | None:
    """Torch threads for each training process on a host without GPUs (None: leave
    accelerate's choice, for GPU hosts): ``launch.cpu_threads``, else ``OMP_NUM_THREADS``,
    else this host's usable CPUs shared among its processes."""
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda and not launch.cpu:
        return None
    if launch.cpu_threads:
        return launch.cpu_threads
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // launch.num_processes)


def accelerate_argv(launch: LaunchConfig, config_path: str | Path,
                    resume: str | None = None,
                    result_file: str | Path | None = None,
                    mixed_precision: str = "no") -> list[str]:
    """The exact ``accelerate launch`` command for one machine of a training stage.

    ``mixed_precision`` is the stage's ``train.mixed_precision`` (declared once, there): the
    trainer's ``Accelerator`` takes it too, and launch gets the same value."""
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(launch.num_processes * launch.num_machines),
            "--num_machines", str(launch.num_machines),
            "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no"]
    # accelerate 1.15 runs a single process under --cpu whatever --num_processes says, so
    # several processes always go through --multi_gpu (gloo on a host without GPUs).
    if launch.num_processes * launch.num_machines > 1:
        argv.append("--multi_gpu")
    elif launch.cpu:
        argv.append("--cpu")
    threads = cpu_threads(launch)
    if threads is not None:
        argv += ["--num_cpu_threads_per_process", str(threads)]
    if launch.num_machines > 1:
        if not launch.main_process_ip:
            raise TrainingError(
                "launch.num_machines > 1 needs launch.main_process_ip (or VITPIPE_MAIN_PROCESS_IP)"
                " so every machine finds rank 0"
            )
        argv += ["--machine_rank", str(launch.machine_rank),
                 "--main_process_ip", launch.main_process_ip,
                 "--main_process_port", str(launch.main_process_port or 29500),
                 "--rdzv_backend", "static",
                 "--rdzv_conf", f"timeout={launch.rendezvous_timeout_s}"]
    elif launch.main_process_port:
        argv += ["--main_process_port", str(launch.main_process_port)]
    argv += ["--module", "vitpipe.cli", "train", "--config", str(config_path)]
    if resume is not None:
        argv += ["--resume", resume]
    if result_file is not None:
        argv += ["--result-file", str(result_file)]
    return argv


class _ChildTree:
    """The launcher and every process under it, remembered while they run.

    ``accelerate launch`` does not forward signals, and a launcher killed by a group-wide
    SIGTERM leaves its trainers orphaned (no longer its descendants): so the tree is snapshot
    as output streams, and stopping waits for every remembered process, not just the launcher.
    """

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.known: dict[int, Any] = {pid: self.root}
        self._last = 0.0

    def refresh(self, every: float = 2.0) -> None:
        now = time.monotonic()
        if now - self._last < every:
            return
        self._last = now
        with contextlib.suppress(self._psutil.Error):
            for p in self.root.children(recursive=True):
                self.known.setdefault(p.pid, p)

    def stop(self, grace: float, emit: Callable[[str], None]) -> None:
        """SIGTERM everything (the trainer checkpoints), wait ``grace`` s, SIGKILL the rest."""
        self._last = 0.0
        self.refresh()
        alive = [p for p in self.known.values() if p.is_running()]
        if not alive:
            return
        emit(f"stopping training processes {sorted(p.pid for p in alive)}: SIGTERM, "
             f"{grace:.0f}s to checkpoint")
        for p in alive:
            with contextlib.suppress(self._psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = self._psutil.wait_procs(alive, timeout=grace)
        for p in alive:
            with contextlib.suppress(self._psutil.Error):
                p.kill()
        self._psutil.wait_procs(alive, timeout=10)


def describe_failure(returncode: int, tail: list[str],
                     errors: list[dict[str, Any]] | None = None) -> str:
    """One readable message: how the child ended, the error its first failing rank recorded
    (type and message; the others listed after it), and its last output lines."""
    if returncode < 0:
        how = f"was killed by {signal.Signals(-returncode).name}"
    else:
        how = f"exited with status {returncode}"
    parts = [f"training process {how}"]
    if errors:
        first = errors[0]
        parts[0] += f": {first.get('type')}: {first.get('message')}"
        parts += [f"(rank {e.get('rank')} also failed: {e.get('type')}: {e.get('message')})"
                  for e in errors[1:]]
        parts += ["--- its traceback, last lines ---", *first.get("traceback", [])[-10:]]
    else:
        parts[0] += " before recording an error (killed, out of memory, or a native crash)"
    parts += ["--- last lines of its output ---", *tail[-15:]]
    return "\n".join(parts)


def run_training_process(
    cfg: TrainConfig,
    launch: LaunchConfig,
    log: Callable[[str], None] | logging.Logger | logging.LoggerAdapter,
    resume: str | None = None,
    env: dict[str, str] | None = None,
    grace: float = 60.0,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run one training stage under ``accelerate launch`` and return the trainer's result dict."""
    emit = log.info if isinstance(log, logging.Logger | logging.LoggerAdapter) else log
    launch = launch_env_overrides(launch)
    with tempfile.TemporaryDirectory(prefix="vitpipe-launch-") as tmp:
        cfg_path = Path(tmp) / "train_config.json"
        cfg_path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        result_path = Path(tmp) / "result.json"
        argv = accelerate_argv(launch, cfg_path, resume, result_file=result_path,
                               mixed_precision=cfg.train.mixed_precision)
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(env or {})}
        emit("launching: " + " ".join(argv))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=child_env, text=True, bufsize=1, errors="replace")
        tree = _ChildTree(proc.pid)
        if on_start:
            on_start(proc.pid)
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                tree.refresh()
                if line.strip():
                    emit(line)
            proc.wait()
        except BaseException:
            # Cancellation / SIGTERM / Ctrl-C reached the flow: let the trainer checkpoint.
            tree.stop(grace, emit)
            raise
        finally:
            if proc.poll() is None:
                tree.stop(5.0, emit)
                proc.wait(10)
        if proc.returncode != 0:
            raise TrainingError(describe_failure(proc.returncode, list(tail),
                                                 read_errors(result_path)))
        result = read_result(result_path)
    if result is None:
        raise TrainingError(
            "training process exited 0 but wrote no result file (expected `vitpipe train"
            " --result-file` to write {run_id, weights, ...})\n" + "\n".join(list(tail)[-10:])
        )
    return result


def follow(poll: float = 5.0) -> int:
    """Non-zero ranks of a multi-node stage: join each attempt of rank 0 until the run ends.

    Reads the flow run (``PREFECT__FLOW_RUN_ID``) parameters from the Prefect API, so every
    machine trains with exactly the config rank 0 received.
    """
    from prefect.client.orchestration import get_client

    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        print("flows.launch follow: PREFECT__FLOW_RUN_ID is not set", file=sys.stderr)
        return 2
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                print(f"flow run {run_id} is {run.state.name}; follower done")
                return 0 if run.state.is_completed() else 1
            params = run.parameters
            cfg = TrainConfig.model_validate(params["config"])
            launch = LaunchConfig.model_validate(params.get("launch") or {})
            try:
                run_training_process(cfg, launch, print, resume="auto")
                done = True
            except TrainingError as err:
                print(f"follower attempt ended: {err}", file=sys.stderr)
                done = False
            while done:  # trained: only wait for rank 0 to finish the run, never relaunch
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    return 0 if run.state.is_completed() else 1
                time.sleep(poll)
            time.sleep(poll)


if __name__ == "__main__":
    if sys.argv[1:2] == ["follow"]:
        sys.exit(follow())
    print("usage: python -m flows.launch follow", file=sys.stderr)
    sys.exit(2)
