"""The engine end to end in-process on real shards and real models: supervised overfit with
EMA and the MLflow contract, MAE pretraining, fine-tuning from a runs:/ URI at a new size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_support import make_shards, train_cfg
from vitpipe.data import read_manifest
from vitpipe.train import train


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    """64 train / 16 val / 80 test images."""
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 80, 32)


@pytest.fixture(scope="module")
def shards240(tmp_path_factory):
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 300, 50)


def _artifacts(client, run_id, path=""):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_supervised_overfits_64_samples_with_ema(tmp_path, shards64, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-xyz")
    cfg = train_cfg(tmp_path, shards64, "mode=supervised", "data.batch_size=32",
                    "train.epochs=60", "train.lr=4e-3", "train.warmup_epochs=4",
                    "train.weight_decay=0", "train.label_smoothing=0", "train.min_lr=1e-4",
                    "train.ema_decay=0.9", "train.clip_grad=1.0", "checkpoint.every_n_steps=40",
                    "log_every_n_steps=10", "eval_every_epochs=20")
    res = train(cfg)
    assert res["steps"] == 120  # 64 / 32 = 2 steps per epoch x 60
    assert res["metrics"]["loss"] < 0.05, res["metrics"]
    assert res["weights"] == str(tmp_path / "out" / "model.safetensors")
    sd = load_file(res["weights"])
    assert "head.weight" in sd and sd["head.weight"].shape == (10, 32)
    ema = load_file(str(tmp_path / "out" / "model_ema.safetensors"))
    assert not torch.equal(ema["head.weight"], sd["head.weight"])
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpts == ["step_000000080", "step_000000120"]  # keep_last=2 of 40/80/120

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["vitpipe.mode"] == "supervised"
    assert tags["vitpipe.prefect_flow_run_id"] == "flow-xyz"
    assert tags["vitpipe.dataset_digest"] == read_manifest(shards64).digest
    assert tags["vitpipe.checkpoint"].endswith("step_000000120")
    params = run.data.params
    assert params["train.lr"] == "0.004" and params["model.depth"] == "2"
    assert params["plan.steps_per_epoch"] == "2" and params["plan.effective_batch"] == "32"
    for key in ("loss", "lr", "grad_norm", "img_s", "val_top1", "val_top1_ema", "epoch_loss"):
        assert client.get_metric_history(res["run_id"], key), key
    lrs = [m.value for m in client.get_metric_history(res["run_id"], "lr")]
    assert max(lrs) <= 4e-3 + 1e-12 and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    arts = _artifacts(client, res["run_id"])
    for a in ("config/train_config.json", "manifest/manifest.json", "weights/model.safetensors",
              "weights/model_ema.safetensors"):
        assert a in arts, arts
    logged_cfg = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=res["run_id"], artifact_path="config/train_config.json",
        dst_path=str(tmp_path / "dl"), tracking_uri=cfg.tracking.uri)).read_text())
    assert logged_cfg["train"]["ema_decay"] == 0.9
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation"}


def test_mae_loss_falls_then_finetune_from_runs_uri_at_new_size(tmp_path, shards240):
    mae_cfg = train_cfg(tmp_path / "mae", shards240, "mode=mae", "data.batch_size=40",
                        "train.epochs=8", "train.lr=2e-3", "train.warmup_epochs=1",
                        "log_every_n_steps=1", "mae.mask_ratio=0.75")
    res = train(mae_cfg)
    assert res["steps"] == 48
    client = mlflow.MlflowClient(tracking_uri=mae_cfg.tracking.uri)
    losses = [m.value for m in sorted(client.get_metric_history(res["run_id"], "loss"),
                                      key=lambda m: m.step)]
    assert sum(losses[-6:]) / 6 < 0.9 * sum(losses[:6]) / 6, losses
    assert res["weights"].endswith("encoder.safetensors")
    enc = load_file(res["weights"])
    assert not any(k.startswith(("decoder", "head.")) for k in enc)
    arts = _artifacts(client, res["run_id"])
    assert "weights/encoder.safetensors" in arts and "plots/mae_reconstructions.png" in arts

    src = f"runs:/{res['run_id']}/weights/encoder.safetensors"
    ft_cfg = train_cfg(tmp_path / "ft", shards240, "mode=finetune", f"init={src}",
                       f"tracking.uri={mae_cfg.tracking.uri}", "model.img_size=35",
                       "data.batch_size=40", "train.max_steps=6", "train.layer_decay=0.5",
                       "train.lr=1e-3")
    out = train(ft_cfg)
    assert out["steps"] == 6 and 0 <= out["metrics"]["val_top1"] <= 1
    ft = load_file(out["weights"])
    assert ft["pos_embed.weight"].shape[1] == 25  # 28/7=4x4 grid resampled to 35/7=5x5
    assert torch.allclose(ft["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"],
                          atol=0.05)


def test_grad_accumulation_and_bf16(tmp_path, shards64):
    cfg = train_cfg(tmp_path, shards64, "data.batch_size=8", "train.accum_steps=2",
                    "train.epochs=2", "train.mixed_precision=bf16", "log_every_n_steps=1")
    res = train(cfg)
    assert res["steps"] == 8  # 64 / 8 = 8 micro-batches per epoch -> 4 optimizer steps x 2
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    params = client.get_run(res["run_id"]).data.params
    assert params["plan.effective_batch"] == "16" and params["plan.steps_per_epoch"] == "4"
    assert all(math.isfinite(m.value) for m in client.get_metric_history(res["run_id"], "loss"))
    assert load_file(res["weights"])["head.weight"].dtype == torch.float32
