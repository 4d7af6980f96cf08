"""MLflow tracking against a real local SQLite store (no mocks)."""

from __future__ import annotations

import socket
import time

import mlflow
import pytest

from vitpipe.config import TrackingConfig
from vitpipe.data.manifest import Manifest
from vitpipe.errors import TrackingError
from vitpipe.tracking import Tracker, check_reachable, manifest_dataset, redact_uri, run_tags


def _manifest() -> Manifest:
    shard = {"name": "train-000000.tar", "count": 64, "bytes": 1000, "sha256": "0" * 64}
    split = {"count": 64, "shards": [shard], "digest": "d" * 16, "class_counts": [32, 32],
             "mean": [0.5], "std": [0.25]}
    return Manifest.model_validate({
        "source": {"kind": "fashion_mnist", "path": "/data/fmnist", "digest": "s" * 16},
        "config": {}, "config_digest": "c", "classes": ["a", "b"], "channels": 1,
        "image_size": (28, 28), "image_format": "png", "mean": [0.5], "std": [0.25],
        "splits": {"train": split, "test": {**split, "digest": "e" * 16}},
        "digest": "m" * 16, "created_at": "now",
    })


def test_run_params_metrics_tags_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-123")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = Tracker(TrackingConfig(uri=uri, experiment="t"))
    tr.check()
    run_id = tr.start(run_name="x", tags=run_tags("supervised", 2))
    tr.log_params({"a.b": "1", "s3.secret_key": "<redacted>"})
    tr.log_metrics({"loss": 2.0, "lr": 1e-3}, step=1)
    tr.log_metrics({"loss": 1.0}, step=2)
    tr.log_dict({"k": 1}, "config/train_config.json")
    tr.log_dataset(_manifest(), str(tmp_path / "manifest.json"), "train", "training")
    tr.end()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["a.b"] == "1"
    assert run.data.tags["vitpipe.mode"] == "supervised"
    assert run.data.tags["vitpipe.world_size"] == "2"
    assert run.data.tags["vitpipe.prefect_flow_run_id"] == "flow-123"
    assert len(run.data.tags["vitpipe.git_commit"]) >= 7
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0, 1.0]
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.digest == "d" * 16
    assert '"num_samples": 64' in ds.profile
    assert inputs[0].tags[0].value == "training"
    arts = [a.path for a in client.list_artifacts(run_id, "config")]
    assert arts == ["config/train_config.json"]
    # artifacts went next to the SQLite file, not into the cwd
    assert (tmp_path / "mlartifacts").is_dir()


def test_env_uri_and_split_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    tr = Tracker(TrackingConfig())
    assert tr.uri == f"sqlite:///{tmp_path}/env.db"
    ds = manifest_dataset(_manifest(), "s3://bucket/shards/manifest.json", "test")
    assert ds.digest == "e" * 16 and ds.profile["split"] == "test"


def test_unreachable_server_fails_fast_naming_uri():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://user:pw@127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}") as err:
        check_reachable(uri, timeout=2)
    assert time.monotonic() - t0 < 10
    assert "pw" not in str(err.value)
    assert redact_uri(uri) == f"http://***@127.0.0.1:{port}"


def test_missing_run_is_a_tracking_error(tmp_path):
    tr = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db"))
    with pytest.raises(TrackingError, match="not found"):
        tr.attach("0" * 32)


def test_inactive_tracker_is_a_noop(tmp_path):
    tr = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/none.db"), active=False)
    tr.check()
    assert tr.start() is None
    tr.log_metrics({"loss": 1.0}, step=1)
    assert not (tmp_path / "none.db").exists()


def test_artifact_store_outage_is_one_named_line(s3_env, tmp_path):
    """MLflow's S3 artifact store down (endpoint refuses): `vitpipe train` ends with one line
    naming the endpoint and the store, no traceback, within bounded time."""
    from tests.test_train_support import cli, free_port, make_shards, train_overrides

    bucket = s3_env.make_bucket("vp-art").removeprefix("s3://").strip("/")
    manifest = make_shards(tmp_path / "shards", 40, 40)
    dead = f"http://127.0.0.1:{free_port()}"
    args = ["train", *train_overrides(tmp_path, manifest, "train.max_steps=1", "data.batch_size=16",
                                      f"tracking.artifact_location=s3://{bucket}/art")]
    res = cli(args, timeout=120, MLFLOW_S3_ENDPOINT_URL=dead)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    line = [ln for ln in res.stderr.splitlines() if "artifact store" in ln]
    assert line, res.stderr[-3000:]
    assert f"s3://{bucket}/art" in line[0] and f"{dead} unreachable" in line[0], line[0]
    assert s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in res.stderr

    # the same run with the endpoint up: the artifacts land in the bucket
    ok = cli(args, timeout=240, MLFLOW_S3_ENDPOINT_URL=s3_env.endpoint_url)
    assert ok.returncode == 0, ok.stderr[-3000:]
    from vitpipe import storage

    assert any(u.endswith("model.safetensors") for u in storage.list_uris(f"s3://{bucket}/art"))
