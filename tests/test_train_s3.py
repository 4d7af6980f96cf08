"""Checkpoints on s3:// (real SeaweedFS): marker-last upload, rotation, auto-resume; and a
fine-tune source given as s3://."""

from __future__ import annotations

import pytest

from tests.test_train_support import make_shards, train_cfg
from vitpipe import storage
from vitpipe.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.getbasetemp() / "shards", 80, 32)


def test_s3_checkpoints_rotate_and_resume(s3_env, tmp_path, shards):
    bucket = s3_env.make_bucket("vp-ckpt").removeprefix("s3://").strip("/")
    root = f"s3://{bucket}/run1"
    common = ["data.batch_size=32", f"checkpoint.dir={root}", "checkpoint.every_n_steps=2",
              "checkpoint.keep_last=1", "train.ema_decay=0.9"]
    first = train(train_cfg(tmp_path, shards, *common, "train.max_steps=4"))
    assert first["checkpoint"] == f"{root}/step_000000004"
    keys = storage.list_uris(root)
    assert all("/step_000000004/" in k for k in keys), keys  # step 2 rotated away
    names = {k.rsplit("/", 1)[1] for k in keys}
    assert {"COMPLETE", "model.safetensors", "optimizer.bin", "ema.safetensors",
            "vitpipe_state.json", "random_states_0.pkl", "rng_check_0.json"} <= names

    second = train(train_cfg(tmp_path, shards, *common, "train.max_steps=6"))
    assert second["resumed_from_step"] == 4 and second["steps"] == 6
    assert second["run_id"] == first["run_id"]  # the same MLflow run continues

    # a fine-tune source on s3://
    src = f"s3://{bucket}/weights/model.safetensors"
    storage.upload_file(second["weights"], src)
    ft = train(train_cfg(tmp_path / "ft", shards, "mode=finetune", f"init={src}",
                         "data.batch_size=32", "train.max_steps=2", "train.layer_decay=0.75"))
    assert ft["steps"] == 2
