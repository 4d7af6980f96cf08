"""Real multi-process runs on CPU (gloo) through ``accelerate launch``.

Note: in accelerate 1.15 ``accelerate launch --cpu --num_processes 2`` runs ONE process (the
simple launcher ignores the count); multi-process CPU runs use ``--multi_gpu``, which on a host
without GPUs starts torchrun workers that pick gloo.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.test_train_support import REPO, env, free_port, make_shards, train_overrides

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """240 train images in shards of 50/50/50/50/40; 60 val (50/10); 300 test (6 x 50)."""
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 300, 50)


def _env(tmp):
    return env(HF_HOME=str(tmp / "hf"))  # no user accelerate config leaks in


def _launch(launch_args, cmd_args, tmp, **extra_env):
    e = _env(tmp) | extra_env
    return subprocess.Popen([*LAUNCH, *launch_args, "-m", "vitpipe.cli", *cmd_args], cwd=REPO,
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digests(out: str) -> dict[int, tuple[int, str]]:
    return {int(r): (int(n), d) for r, n, d in
            re.findall(r"rank (\d+)/2: (\d+) steps, param digest (\w+)", out)}


def test_two_processes_uneven_shards_then_distributed_eval(tmp_path, uneven):
    args = ["train", "--mode", "supervised", *train_overrides(
        tmp_path, uneven, "data.batch_size=16", "train.max_steps=10", "checkpoint.every_n_steps=5",
        "dist.timeout_s=60")]
    p = _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1"], args, tmp_path)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-4000:]
    assert '"world_size": 2' in out and '"steps_per_epoch": 7' in out  # 240 / (2 x 16) -> 7
    dig = _digests(out)
    assert set(dig) == {0, 1} and dig[0] == dig[1] and dig[0][0] == 10, out
    ck = tmp_path / "ckpt" / "step_000000010"
    assert {"rng_check_0.json", "rng_check_1.json", "COMPLETE"} <= {f.name for f in ck.iterdir()}

    # evaluate on 2 ranks: 300 test samples, each counted once (evaluate() checks the count)
    weights = tmp_path / "out" / "model.safetensors"
    ev = [f"data.manifest={uneven}", f"weights={weights}", "split=test",
          f"output_dir={tmp_path}/eval2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
          "data.eval_batch_size=64", "data.num_workers=0", "num_attention_images=2",
          "model.name=vit_tiny_patch7_28", "model.depth=2", "model.embed_dim=32",
          "model.num_heads=2"]
    p = _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1"],
                ["evaluate", *ev], tmp_path)
    out2, err2 = p.communicate(timeout=240)
    assert p.returncode == 0, err2[-4000:]
    assert '"test_num_samples": 300.0' in out2
    from vitpipe.config import EvaluateConfig, load
    from vitpipe.evaluate import evaluate

    single = evaluate(load(EvaluateConfig, None, [*ev, f"output_dir={tmp_path}/eval1"]))
    top1 = float(re.search(r'"test_top1": ([0-9.e-]+)', out2).group(1))
    assert single["test_num_samples"] == 300 and abs(single["test_top1"] - top1) < 1e-9


def _two_machines(tmp, shards, max_steps, fault_env=None):
    port = free_port()
    args = ["train", "--mode", "supervised", *train_overrides(
        tmp, shards, "data.batch_size=16", f"train.max_steps={max_steps}",
        "checkpoint.every_n_steps=2", "dist.timeout_s=30", "dist.preflight_timeout_s=60")]
    procs = []
    for rank in (0, 1):
        launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "2",
                  "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                  "--main_process_port", str(port)]
        extra = (fault_env or {}) if rank == 1 else {}
        procs.append(_launch(launch, args, tmp, **extra))
    return procs


def test_two_machines_on_loopback(tmp_path, uneven):
    procs = _two_machines(tmp_path, uneven, 4)
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    dig = _digests(outs[0][0])
    assert set(dig) == {0, 1} and dig[0] == dig[1] and dig[0][0] == 4
    assert '"world_size": 2' in outs[0][0]


def test_peer_death_makes_survivor_exit_with_clear_error(tmp_path, uneven):
    procs = _two_machines(tmp_path, uneven, 200, {"VITPIPE_FAULT_KILL_AT_STEP": "3",
                                                  "VITPIPE_FAULT_RANK": "1"})
    t0 = time.monotonic()
    out0, err0 = procs[0].communicate(timeout=240)
    waited = time.monotonic() - t0
    procs[1].communicate(timeout=60)
    assert procs[0].returncode != 0
    assert "a peer process died or stalled" in err0, err0[-4000:]
    assert "rank 0" in err0 and "--resume auto" in err0
    assert procs[1].returncode != 0
    assert waited < 180
    # the last checkpoint both ranks completed is there to resume from
    assert (tmp_path / "ckpt" / "step_000000002" / "COMPLETE").is_file()
