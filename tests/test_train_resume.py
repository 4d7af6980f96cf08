"""Exact resume after a real SIGKILL, and SIGTERM -> checkpoint -> clean exit -> resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_support import REPO, env, make_shards, train_overrides
from vitpipe.config import TrainConfig, load
from vitpipe.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 300, 50)


# augmentation, MixUp/CutMix, drop path, EMA and a loader worker: every RNG path is exercised
RECIPE = [
    "mode=supervised", "data.batch_size=40", "train.epochs=2", "train.lr=1e-3",
    "train.warmup_epochs=1", "train.ema_decay=0.9", "train.clip_grad=1.0",
    "checkpoint.every_n_steps=4", "checkpoint.keep_last=2", "log_every_n_steps=2",
    "model.drop_path_rate=0.1", "data.augment.random_resized_crop=true",
    "data.augment.hflip=0.5", "data.augment.mixup_alpha=0.8", "data.augment.cutmix_alpha=1.0",
    "data.num_workers=1",
]


def _popen(tmp, shards, *extra, **env_extra):
    args = [sys.executable, "-m", "vitpipe.cli", "train",
            *train_overrides(tmp, shards, *RECIPE, *extra)]
    return subprocess.Popen(args, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, shards):
    killed = _popen(tmp_path / "cut", shards, VITPIPE_FAULT_KILL_AT_STEP="10")
    # the uninterrupted reference runs in this process meanwhile
    full = train(load(TrainConfig, None, train_overrides(tmp_path / "full", shards, *RECIPE)))
    assert full["steps"] == 12
    out_k, err_k = killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL, err_k[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "ckpt").iterdir())
    assert ckpts == ["step_000000004", "step_000000008"], ckpts  # 8 = epoch 1, 2 steps in
    resumed = _popen(tmp_path / "cut", shards)
    out_r, err_r = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err_r[-3000:]
    assert "resumed from" in out_r and "step_000000008" in out_r
    for name in ("model.safetensors", "model_ema.safetensors"):
        a = load_file(str(tmp_path / "full" / "out" / name))
        b = load_file(str(tmp_path / "cut" / "out" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (name, k)
    # the resumed process continued the same MLflow run
    uri = f"sqlite:///{tmp_path}/cut/mlflow.db"
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_sigterm_saves_checkpoint_and_exits(tmp_path, shards):
    proc = _popen(tmp_path, shards, "train.epochs=500", "checkpoint.every_n_steps=100000",
                  "data.num_workers=0")
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline:  # wait until training is under way (first epoch done)
        line = proc.stdout.readline()
        if line.startswith("epoch 0 ") or not line:
            break
    assert line.startswith("epoch 0 "), proc.stderr.read()[-3000:]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM: interrupted, checkpointed
    assert "stopped by signal 15" in err and "--resume auto" in err
    done = [p for p in (tmp_path / "ckpt").iterdir() if (p / "COMPLETE").is_file()]
    assert len(done) == 1
    step = int(done[0].name.split("_")[1])
    assert step >= 6
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert run.data.tags["vitpipe.checkpoint"] == str(done[0])
    # and it resumes from there
    res = train(load(TrainConfig, None, train_overrides(
        tmp_path, shards, *RECIPE, "data.num_workers=0", f"train.max_steps={step + 2}")))
    assert res["steps"] == step + 2 and res["resumed_from_step"] == step
    assert client.get_run(res["run_id"]).info.status == "FINISHED"
