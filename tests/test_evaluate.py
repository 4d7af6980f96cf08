"""``evaluate(cfg)`` on weights trained by the engine: metrics, plots, metrics.json, logging
into the training run, and clear errors for bad weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import save_file

from tests.test_train_support import TINY, make_shards, train_cfg
from vitpipe.config import EvaluateConfig, load
from vitpipe.errors import CheckpointError
from vitpipe.train import train

MODEL = [o for o in TINY if o.startswith("model.")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    shards = make_shards(tmp_path_factory.getbasetemp() / "shards", 300, 50)
    res = train(train_cfg(tmp, shards, "data.batch_size=40", "train.epochs=2", "train.lr=2e-3",
                          "log_every_n_steps=2", "train.ema_decay=0.9"))
    return tmp, shards, res


def _cfg(tmp, shards, *extra):
    return load(EvaluateConfig, None, [
        f"data.manifest={shards}", "split=test", f"output_dir={tmp}/eval",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", "data.num_workers=0", "ece_bins=10",
        "num_attention_images=4", "data.eval_batch_size=64", *MODEL, *extra])


def test_evaluate_logs_into_training_run(trained):
    tmp, shards, res = trained
    from vitpipe.evaluate import evaluate

    out = evaluate(_cfg(tmp, shards, f"run_id={res['run_id']}"))  # weights from the run
    assert out["test_num_samples"] == 300
    assert 0.1 < out["test_top1"] <= out["test_top5"] <= 1
    assert 0 <= out["test_ece"] <= 1
    assert set(out["per_class_accuracy"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                              "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                                              "Ankle boot"}
    assert sum(map(sum, out["confusion_matrix"])) == 300
    for name in ("confusion_matrix", "reliability", "training_curves", "attention",
                 "metrics_json"):
        assert name in out["artifacts"], out["artifacts"]
    for path in out["artifacts"].values():
        if path.endswith(".png"):
            assert Path(path).read_bytes()[:4] == b"\x89PNG"
    payload = json.loads(Path(out["artifacts"]["metrics_json"]).read_text())
    assert payload["metrics"]["test_top1"] == out["test_top1"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(res["run_id"])
    assert run.data.metrics["test_top1"] == pytest.approx(out["test_top1"])
    assert run.data.tags["vitpipe.eval_digest"] == payload["dataset_digest"]
    assert run.info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(res["run_id"], "plots")}
    assert {"plots/test_confusion_matrix.png", "plots/test_reliability.png",
            "plots/training_curves.png", "plots/test_attention_rollout.png"} <= plots
    evaluate_run = client.list_artifacts(res["run_id"], "eval")
    assert [a.path for a in evaluate_run] == ["eval/metrics.json"]


def test_ema_weights_and_bad_weights(trained):
    tmp, shards, res = trained
    from vitpipe.evaluate import evaluate

    ema = evaluate(_cfg(tmp, shards, f"weights={tmp}/out/model_ema.safetensors",
                        "num_attention_images=0", f"output_dir={tmp}/eval_ema"))
    assert ema["test_num_samples"] == 300 and ema["run_id"]  # a fresh evaluation run
    bad = tmp / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(CheckpointError, match="another architecture"):
        evaluate(_cfg(tmp, shards, f"weights={bad}"))
    # vitpipe's weights carry their architecture: a config for another depth still evaluates
    # them as they are (a champion re-evaluated under a newer preset stays itself)
    same = [evaluate(_cfg(tmp, shards, f"weights={tmp}/out/model.safetensors", *extra,
                          "num_attention_images=0", f"output_dir={tmp}/eval_arch{i}"))
            for i, extra in enumerate([(), ("model.depth=3",)])]
    assert same[0]["test_top1"] == same[1]["test_top1"]


def test_skipped_samples_are_mlflow_metrics_per_split(trained, tmp_path):
    """A changed byte in a test, train and val sample: evaluation and training skip it, count
    it per split in MLflow and name it in metrics.json."""
    from tests.test_data_support import copy_shards, flip_member_byte
    from vitpipe.data import read_manifest
    from vitpipe.evaluate import evaluate

    tmp, shards, res = trained
    bad = copy_shards(shards, tmp_path / "shards")
    m = read_manifest(bad)
    flipped = {split: flip_member_byte(bad, m.splits[split].shards[0].name, "cls")[0]
               for split in ("train", "val", "test")}
    out = evaluate(_cfg(tmp_path, bad, f"weights={tmp}/out/model.safetensors",
                        "num_attention_images=2", "data.max_bad_fraction=0.05"))
    assert out["skipped_samples_test"] == 1 and out["test_num_samples"] == 299
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(out["run_id"]).data.metrics["skipped_samples_test"] == 1
    payload = json.loads(Path(out["artifacts"]["metrics_json"]).read_text())
    assert payload["skipped_samples"] == [{"shard": m.splits["test"].shards[0].name,
                                           "key": flipped["test"]}]
    # training: per epoch, summed over ranks (and 0 for a clean split)
    res = train(train_cfg(tmp_path / "t", bad, "data.batch_size=40", "train.epochs=2",
                          "data.max_bad_fraction=0.05"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/t/mlflow.db")
    hist = {k: [mm.value for mm in client.get_metric_history(res["run_id"], k)]
            for k in ("skipped_samples_train", "skipped_samples_val")}
    assert hist == {"skipped_samples_train": [1.0, 1.0], "skipped_samples_val": [1.0, 1.0]}


def test_evaluate_and_register_chain_from_a_training_run_id(trained, capsys):
    """`vitpipe evaluate --run <id>|latest` needs no weights, manifest or model keys: they come
    from what the training run recorded; `register --run` registers the same run."""
    from vitpipe.cli import main as cli_main

    tmp, shards, res = trained
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_run(res["run_id"]).info.experiment_id
    mae = client.create_run(exp, tags={"vitpipe.mode": "mae"})  # newer, but no classifier
    client.set_terminated(mae.info.run_id)
    base = [f"tracking.uri={uri}", "tracking.experiment=test", f"output_dir={tmp}/eval-chain",
            "num_attention_images=0"]

    assert cli_main(["evaluate", "--run", "latest", *base]) == 0
    out = json.loads(capsys.readouterr().out)
    direct = __import__("vitpipe.evaluate", fromlist=["evaluate"]).evaluate(
        _cfg(tmp, shards, f"run_id={res['run_id']}", "num_attention_images=0"))
    assert out["test_top1"] == pytest.approx(direct["test_top1"])
    assert out["test_num_samples"] == 300
    assert json.loads((tmp / "eval-chain" / "metrics.json").read_text())["weights"] == \
        f"runs:/{res['run_id']}/weights/model.safetensors"

    assert cli_main(["evaluate", "--run", res["run_id"], *base, "split=val"]) == 0  # key wins
    assert "val_top1" in json.loads(capsys.readouterr().out)

    assert cli_main(["evaluate", "--run", mae.info.run_id, *base]) == 2
    assert "MAE pretraining leaves only an encoder" in capsys.readouterr().err
    assert cli_main(["evaluate", "--run", "latest", *base, "tracking.experiment=nothing"]) == 2
    assert "no finished distill/finetune/supervised run" in capsys.readouterr().err

    assert cli_main(["register", "--run", "latest", *base[:2], "model_name=chain-tiny"]) == 0
    reg = json.loads(capsys.readouterr().out)
    assert reg["run_id"] == res["run_id"] and reg["champion"] == "1"
