"""Bad input fails with a clear error naming what and where, before any training step."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from tests.test_train_support import cli, free_port, make_shards, train_cfg, train_overrides
from vitpipe.config import ConfigError, TrainConfig, load
from vitpipe.errors import CheckpointError, TrackingError
from vitpipe.train import micro_batch_size, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 80, 32)


def test_unknown_key_and_bad_lr_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'.*did you mean 'train.lr'"):
        load(TrainConfig, None, ["train.lrr=1e-3"])
    for bad in ("train.lr=0", "train.lr=-1", "train.blr=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load(TrainConfig, None, [bad])
    with pytest.raises(ConfigError, match="use_ema_for_export"):
        load(TrainConfig, None, ["train.use_ema_for_export=true"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid with a GPU")
def test_fp16_on_cpu_is_refused(tmp_path, shards):
    with pytest.raises(ConfigError, match="mixed_precision=fp16 needs a CUDA GPU"):
        train(train_cfg(tmp_path, shards, "train.mixed_precision=fp16"))


def test_cli_config_error_exit_code(tmp_path):
    res = cli(["train", "--mode", "supervised", "train.epoch=3"], timeout=120)
    assert res.returncode == 2
    assert "unknown key 'train.epoch'" in res.stderr and "train.epochs" in res.stderr


def test_global_batch_semantics():
    cfg = load(TrainConfig, None, ["data.batch_size=7"])
    assert micro_batch_size(cfg, 4) == 7  # per process, no divisibility needed
    cfg = load(TrainConfig, None, ["train.global_batch_size=96", "train.accum_steps=3"])
    assert micro_batch_size(cfg, 2) == 16
    with pytest.raises(ConfigError, match=r"global_batch_size=96 .*accum_steps \(3\) x world "
                                          r"size \(5\) = 15"):
        micro_batch_size(cfg, 5)


def test_indivisible_global_batch_fails_before_work(tmp_path, shards):
    cfg = train_cfg(tmp_path, shards, "train.global_batch_size=30", "train.accum_steps=4")
    with pytest.raises(ConfigError, match="global_batch_size=30"):
        train(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_unreachable_tracking_server_fails_first(tmp_path):
    port = free_port()
    cfg = train_cfg(tmp_path, str(tmp_path / "no" / "manifest.json"),
                    f"tracking.uri=http://127.0.0.1:{port}", "tracking.connect_timeout=2")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port}.*unreachable"):
        train(cfg)  # the manifest does not exist either: tracking is checked first
    assert time.monotonic() - t0 < 15


def test_checkpoint_from_another_architecture(tmp_path, shards):
    train(train_cfg(tmp_path, shards, "train.max_steps=2", "checkpoint.every_n_steps=1",
                    "data.batch_size=32"))
    cfg = train_cfg(tmp_path, shards, "model.embed_dim=48", "train.max_steps=4",
                    "data.batch_size=32")
    with pytest.raises(CheckpointError, match=r"step_000000002 is from another architecture.*"
                                              r"shape mismatch"):
        train(cfg)


def test_finetune_source_without_encoder_weights(tmp_path, shards):
    bad = tmp_path / "not_an_encoder.safetensors"
    save_file({"decoder.weight": torch.zeros(3, 3), "foo": torch.ones(2)}, str(bad))
    cfg = train_cfg(tmp_path, shards, "mode=finetune", f"init={bad}")
    with pytest.raises(CheckpointError, match=r"not_an_encoder.safetensors has no encoder "
                                              r"weights"):
        train(cfg)
    missing = train_cfg(tmp_path, shards, "mode=finetune", f"init={tmp_path}/nope.safetensors")
    with pytest.raises(CheckpointError, match="nope.safetensors does not exist"):
        train(missing)
    with pytest.raises(ConfigError, match="needs 'init'"):
        load(TrainConfig, None, train_overrides(tmp_path, shards, "mode=finetune"))
