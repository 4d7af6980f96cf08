"""Scheduled retraining end to end (`python -m flows.pipeline`, ephemeral Prefect; MLflow on
SQLite, and a real `mlflow server` with its artifacts in SeaweedFS S3): an ImageFolder source
grows -> a new dataset version with new shards only -> a
warm start from the champion -> the champion re-evaluated on the new test split -> the
decision recorded; an unchanged re-run trains nothing; --force retrains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.test_data_versions import _add_images
from vitpipe.data import read_manifest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "retrain-vit"
pytestmark = pytest.mark.timeout(1500)


def _preset(tmp: Path, tracking: dict) -> Path:
    runs = tmp / "runs"
    preset = {
        "name": "retrain",
        "model": {"name": "vit_tiny_patch4_28", "num_classes": 2, "depth": 1, "embed_dim": 32,
                  "num_heads": 2},
        "data": {"batch_size": 16, "eval_batch_size": 64, "num_workers": 0},
        "tracking": tracking,
        "shard": {"source": {"kind": "imagefolder", "path": str(tmp / "src" / "train"),
                             "test_path": str(tmp / "src" / "test")},
                  "output": str(tmp / "shards"), "max_samples_per_shard": 32, "workers": 1,
                  "val_fraction": 0.2},
        # warm start from the champion; the first run has none and trains from scratch
        "finetune": {"mode": "finetune", "init": "champion",
                     "train": {"epochs": 1, "max_steps": 2, "warmup_epochs": 0,
                               "num_threads": 1},
                     "checkpoint": {"dir": str(runs / "ft" / "ckpt")},
                     "output_dir": str(runs / "ft")},
        "evaluate": {"split": "test", "output_dir": str(runs / "eval"),
                     "num_attention_images": 0},
        # the gate compares on the same split, whatever the figures: promote any gain
        "register": {"model_name": MODEL, "digest_mismatch": "refuse"},
        "launch": {"cpu": True},
        "orchestration": {"scope_checkpoints": True},
    }
    path = tmp / "retrain.yaml"
    path.write_text(json.dumps(preset))
    return path


def _pipeline(tmp: Path, tracking: dict, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env.update({"PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED":
                "false", "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results")})
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--config",
                          str(_preset(tmp, tracking)), "--json", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = res.stdout
    return json.loads(out[out.index("{\n"):]) | {"_log": res.stderr + out}


@pytest.fixture(params=["sqlite", "server"])
def tracking(request, tmp_path: Path) -> dict:
    """The embedded store, or the MLflow server with S3 artifacts (weights, manifests and the
    champion's download for the warm start and the re-evaluation all go through it)."""
    if request.param == "sqlite":
        return {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "retrain",
                "artifact_location": str(tmp_path / "mlartifacts")}
    server = request.getfixturevalue("mlflow_server")
    return {"uri": server.uri, "experiment": f"retrain-{tmp_path.name}"}


def test_grown_source_warm_start_fair_gate_then_nothing_to_do(tmp_path: Path,
                                                               tracking: dict) -> None:
    src = tmp_path / "src"
    _add_images(src / "train", 0, 30)
    _add_images(src / "test", 0, 8)
    client = mlflow.MlflowClient(tracking["uri"])
    if client.search_registered_models(f"name = '{MODEL}'"):  # the session's server
        client.delete_registered_model(MODEL)

    first = _pipeline(tmp_path, tracking)
    assert first["model_version"] == "1" and first["promoted"] and not first["skipped"]
    assert first["warm_start"] is None and "no champion yet" in first["_log"]
    v1 = read_manifest(str(tmp_path / "shards"))
    old_shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}

    # new data: 2 x 10 train images and 2 x 4 test images, and the test split may grow
    _add_images(src / "train", 30, 10)
    _add_images(src / "test", 8, 4)
    second = _pipeline(tmp_path, tracking, "shard.grow_test=true")
    v2 = read_manifest(str(tmp_path / "shards"))
    assert v2.version == 2 and v2.parent == v1.digest
    new = {p.name for p in (tmp_path / "shards").glob("*.tar")} - set(old_shards)
    assert sum(s.count for sp in v2.splits.values() for s in sp.shards if s.name in new) == 28
    assert all((tmp_path / "shards" / n).stat().st_mtime_ns == t for n, t in old_shards.items())
    assert v2.splits["test"].count == 24 and v2.splits["test"].digest != v1.splits["test"].digest
    # warm start from the champion's concrete version
    assert second["warm_start"] == f"models:/{MODEL}/1" and second["model_version"] == "2"
    ft = client.get_run(second["finetune_run_id"])
    assert ft.data.params["init"] == f"models:/{MODEL}/1"
    # the champion re-evaluated on the new test split, linked to both versions
    decision = second["decision"]
    assert decision["champion_eval_run"], decision
    reeval = client.get_run(decision["champion_eval_run"])
    assert reeval.data.tags["vitpipe.reeval.champion_version"] == "1"
    assert reeval.data.tags["vitpipe.reeval.candidate_version"] == "2"
    assert reeval.data.tags["vitpipe.eval_digest"] == \
        client.get_run(second["finetune_run_id"]).data.tags["vitpipe.eval_digest"]
    assert reeval.data.metrics["test_num_samples"] == 24
    assert decision["champion_digest"] == reeval.data.tags["vitpipe.eval_digest"]
    assert decision["champion_value"] == reeval.data.metrics["test_top1"]
    assert "not comparable" not in decision["reason"]  # compared on one split, not refused
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["vitpipe.gate.champion_eval_run"] == reeval.info.run_id
    assert tags["vitpipe.gate.champion_recorded"].endswith(v1.splits["test"].digest)

    # nothing changed: nothing trained, and the summary says which version has these inputs
    third = _pipeline(tmp_path, tracking, "shard.grow_test=true")
    assert third["skipped"] and third["inputs_digest"] == second["inputs_digest"]
    assert third["model_version"] == "2" and "nothing retrained" in third["decision"]["reason"]
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
    # --force retrains on the same inputs
    forced = _pipeline(tmp_path, tracking, "shard.grow_test=true", "--force")
    assert not forced["skipped"] and forced["model_version"] == "3"
