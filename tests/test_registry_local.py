"""The same registry code on the embedded SQLite store (no server): the pyfunc's input forms and
preprocessing against an independent reference, per-row errors, digest handling, rollback, and
clear errors for missing runs/artifacts/models/aliases and an unreachable server."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.test_registry_support import (
    TINY,
    direct_topk,
    eval_digest_of,
    fmnist_test,
    log_training_run,
    make_manifest,
    png_bytes,
)
from vitpipe.config import RegisterConfig, TrackingConfig
from vitpipe.errors import TrackingError
from vitpipe.models import build_from_config
from vitpipe.registry import register, rollback
from vitpipe.registry.predict import _table, load_model, predict_cli
from vitpipe.stack.process import free_port

NAME = "local-tiny"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """v1 registered (champion) on a fresh embedded store, loaded back through models:/."""
    tmp = tmp_path_factory.mktemp("registry-local")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    manifest = make_manifest(tmp)
    digest = eval_digest_of(manifest)
    rid, model = log_training_run(uri, manifest, tmp, seed=7, top1=0.70, eval_digest=digest)
    tracking = TrackingConfig(uri=uri)
    res = register(RegisterConfig(model_name=NAME, run_id=rid, top_k=3, tracking=tracking))
    loaded = load_model(f"models:/{NAME}@champion", tracking)
    return {"uri": uri, "tmp": tmp, "manifest": manifest, "digest": digest, "model": model,
            "loaded": loaded, "tracking": tracking, "v1": res}


def _expect(local, images: np.ndarray, k: int = 3):
    return direct_topk(local["model"], local["manifest"], images, k)


def test_first_version_is_champion_on_embedded_store(local):
    res = local["v1"]
    assert res["promoted"] and res["previous_champion"] is None and res["version"] == "1"
    mv = MlflowClient(local["uri"]).get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "1" and mv.tags["vitpipe.gate.reason"] == "no champion yet"


def test_every_input_form_gives_the_reference_prediction(local, tmp_path):
    images, _ = fmnist_test(8)
    probs, idx = _expect(local, images)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(images[3]))
    b64 = base64.b64encode(png_bytes(images[4])).decode()
    rows = [
        png_bytes(images[0]),  # encoded bytes
        base64.b64encode(png_bytes(images[1])).decode(),  # base64 text
        images[2],  # numpy (H, W) uint8
        str(path),  # a file path
        "data:image/png;base64," + b64,  # a data URL
        png_bytes(images[5], mode="RGB"),  # RGB image for a grayscale model: converted
        images[6][None].astype(np.float32) / 255.0,  # (1, H, W) float in [0, 1]
        np.repeat(images[7][..., None], 3, axis=-1),  # (H, W, 3) uint8
    ]
    out = local["loaded"].predict(pd.DataFrame({"image": rows}))
    assert list(out.columns) == ["label", "top_k_labels", "top_k_indices", "top_k_probs",
                                 "error"]
    assert out["error"].isna().all(), out["error"].tolist()
    assert out["top_k_indices"].tolist() == idx.tolist()
    np.testing.assert_allclose(np.array(out["top_k_probs"].tolist()), probs, atol=1e-5)
    classes = local["loaded"].unwrap_python_model().classes
    assert out["label"].tolist() == [classes[i] for i in idx[:, 0]]
    assert out["top_k_labels"].tolist() == [[classes[i] for i in row] for row in idx]


def test_containers_and_top_k_param(local):
    images, _ = fmnist_test(4)
    probs, idx = _expect(local, images, k=5)
    pngs = [png_bytes(i) for i in images]
    model = local["loaded"]
    arrays = {"image": list(images)}  # arrays: in a dict or a DataFrame column
    for given in (pngs, pd.Series(pngs), arrays):
        out = model.predict(given, params={"top_k": 5})
        assert out["top_k_indices"].tolist() == idx.tolist(), type(given)
    one = model.predict(pngs[0], params={"top_k": 5})  # a single value
    assert one["top_k_indices"].tolist() == idx[:1].tolist()
    default = model.predict(pngs)  # the registered default top_k (3)
    assert [len(r) for r in default["top_k_probs"]] == [3] * 4


def test_bad_rows_get_errors_and_good_rows_still_predict(local, tmp_path):
    images, _ = fmnist_test(2)
    _, idx = _expect(local, images)
    rows = [
        png_bytes(images[0]),
        b"\x89PNG\r\n\x1a\n garbage",  # undecodable bytes
        np.zeros((28, 28, 2), np.uint8),  # wrong number of channels
        str(tmp_path / "missing.png"),  # a file that does not exist
        None,
        np.zeros((2, 3, 28, 28), np.uint8),  # not an image shape
        png_bytes(images[1]),
        _png16(images[0]),  # 16-bit grayscale: refused, not clipped to 8 bits
    ]
    out = local["loaded"].predict(pd.DataFrame({"image": rows}))
    err = out["error"].tolist()
    assert err[0] is None and err[6] is None
    assert out["top_k_indices"][0] == idx[0].tolist() and out["top_k_indices"][6] == idx[1].tolist()
    assert err[1].startswith("row 1:") and "does not decode" in err[1]
    assert err[2].startswith("row 2:") and "has 2 channels" in err[2]
    assert err[3].startswith("row 3:") and "no such image file" in err[3]
    assert "missing.png" in err[3]
    assert err[4].startswith("row 4:") and "empty value" in err[4]
    assert err[5].startswith("row 5:") and "shape (2, 3, 28, 28)" in err[5]
    assert err[7].startswith("row 7:") and "unsupported mode 'I;16'" in err[7]
    assert out["label"][1] is None and out["top_k_probs"][2] is None


def _png16(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_cli_table_json_and_per_file_errors(local, tmp_path, capsys, monkeypatch):
    images, _ = fmnist_test(2)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(images[0]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local["uri"])
    assert predict_cli(f"models:/{NAME}@champion", [str(good)], top_k=2) == 0
    table = capsys.readouterr().out.splitlines()
    _, idx = _expect(local, images[:1], k=2)
    classes = local["loaded"].unwrap_python_model().classes
    assert table[0].split()[:3] == ["file", "rank", "class"]
    assert "good.png" in table[1] and classes[idx[0, 0]] in table[1] and len(table) == 3
    missing = tmp_path / "missing.png"
    assert predict_cli(f"models:/{NAME}@champion", [str(bad), str(missing), str(good)],
                       top_k=2, as_json=True) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["file"] for r in rows] == [str(bad), str(missing), str(good)]
    assert rows[0]["error"].startswith("row 0:") and "does not decode" in rows[0]["error"]
    assert "cannot read" in rows[1]["error"] and "No such file" in rows[1]["error"]
    assert rows[2]["error"] is None and rows[2]["top_k"][0]["index"] == idx[0, 0]
    assert "bad.png" in captured.err and "missing.png" in captured.err
    assert "ERROR" in _table([{"file": "b.png", "error": "row 0: broken", "top_k": []}])


def test_different_test_digest_is_refused_then_promoted_with_warning_and_rolled_back(local):
    client = MlflowClient(local["uri"])
    tracking = local["tracking"]
    other = "e" * 64  # evaluated on some other test split
    rid, _ = log_training_run(local["uri"], local["manifest"], local["tmp"], seed=8, top1=0.99,
                              eval_digest=other)
    refused = register(RegisterConfig(model_name=NAME, run_id=rid, tracking=tracking))
    assert not refused["promoted"] and "not comparable" in refused["decision"]["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == refused["version"]

    warned = register(RegisterConfig(model_name=NAME, run_id=rid, tracking=tracking,
                                     digest_mismatch="promote_with_warning"))
    assert warned["promoted"] and warned["previous_champion"] == "1"
    mv = client.get_model_version(NAME, warned["version"])
    assert "digest" in mv.tags["vitpipe.gate.warning"] and "WARNING" in mv.description

    back = rollback(NAME, tracking)
    assert back == {"model_name": NAME, "champion": "1", "demoted": warned["version"]}
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    with pytest.raises(TrackingError, match="no recorded previous champion"):
        rollback(NAME, tracking)  # v1 was the first champion: nothing before it


def test_missing_run_artifact_and_unknown_run_are_clear_errors(local):
    rid, _ = log_training_run(local["uri"], local["manifest"], local["tmp"], seed=9, top1=0.9,
                              eval_digest=local["digest"], with_weights=False)
    cfg = RegisterConfig(model_name=NAME, run_id=rid, tracking=local["tracking"])
    with pytest.raises(TrackingError, match=rf"run '{rid}' has no artifact "
                                            r"'weights/model.safetensors'"):
        register(cfg)
    with pytest.raises(TrackingError, match=r"training run 'f{32}' does not exist"):
        register(cfg.model_copy(update={"run_id": "f" * 32}))


def test_unknown_model_or_alias_is_a_clear_error(local):
    with pytest.raises(TrackingError, match="no registered model named 'nope'"):
        load_model("models:/nope@champion", local["tracking"])
    with pytest.raises(TrackingError, match=f"'{NAME}' has no alias '@gold'"):
        load_model(f"models:/{NAME}@gold", local["tracking"])
    with pytest.raises(TrackingError, match=f"'{NAME}' has no version 99"):
        load_model(f"models:/{NAME}/99", local["tracking"])


def test_unreachable_tracking_server_fails_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"
    tracking = TrackingConfig(uri=uri, connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"{uri} is unreachable"):
        register(RegisterConfig(run_id="a" * 32, tracking=tracking))
    with pytest.raises(TrackingError, match="unreachable"):
        load_model("models:/x@champion", tracking)
    assert time.monotonic() - t0 < 10
    # a blackholed address (no RST): the connect timeout bounds it
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        register(RegisterConfig(run_id="a" * 32,
                                tracking=TrackingConfig(uri="http://10.255.255.1:5000",
                                                        connect_timeout=1.5)))
    assert time.monotonic() - t0 < 6


def test_loading_model_in_process_uses_the_registered_files(local):
    # the pyfunc carries weights as safetensors, plus the train config and manifest
    path = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1",
                                                    tracking_uri=local["uri"]))
    names = {p.name for p in (path / "artifacts").iterdir()}
    assert {"model.safetensors", "train_config.json", "manifest.json"} <= names
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.pth"))
    assert not list(path.rglob("*.pkl"))  # models from code: nothing to unpickle on load
    reqs = (path / "requirements.txt").read_text()
    assert "vitpipe==" in reqs and "torch" not in reqs  # vitpipe brings torch itself


def test_registers_what_the_real_trainer_and_evaluator_logged(local, tmp_path):
    """Contract check with the real stages: train (a few steps) -> evaluate -> register; the
    pyfunc then predicts exactly like the trained weights on real test images, with the
    model's flip averaging (``tta_hflip``) as the trainer and evaluator configured it."""
    from vitpipe.config import (
        CheckpointConfig,
        DataConfig,
        EvaluateConfig,
        OptimConfig,
        TrainConfig,
    )
    from vitpipe.evaluate import evaluate
    from vitpipe.train import train
    from vitpipe.weights import load_safetensors

    tta = TINY.model_copy(update={"tta_hflip": True})
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_location=str(tmp_path / "mlartifacts"))
    data = DataConfig(manifest=str(local["manifest"]), batch_size=32, eval_batch_size=64,
                      num_workers=0)
    trained = train(TrainConfig(
        model=tta, data=data, tracking=tracking, output_dir=str(tmp_path / "train"),
        train=OptimConfig(max_steps=2, epochs=1, warmup_epochs=0), progress=False,
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), resume=None)))
    metrics = evaluate(EvaluateConfig(run_id=trained["run_id"], weights=str(trained["weights"]),
                                      model=tta, data=data, tracking=tracking,
                                      output_dir=str(tmp_path / "eval"), num_attention_images=0))
    res = register(RegisterConfig(model_name="e2e", run_id=trained["run_id"], tracking=tracking))
    assert res["promoted"] and res["version"] == "1"
    mv = MlflowClient(tracking.uri).get_model_version("e2e", "1")
    assert mv.tags["vitpipe.eval_digest"] == local["digest"]
    assert float(mv.tags["vitpipe.metric.test_top1"]) == pytest.approx(metrics["test_top1"])
    assert mv.tags["vitpipe.training_run_id"] == trained["run_id"]

    model, plain = build_from_config(tta).eval(), build_from_config(TINY).eval()
    model.load_state_dict(load_safetensors(trained["weights"])[0])
    plain.load_state_dict(model.state_dict())
    images, _ = fmnist_test(8)
    probs, idx = direct_topk(model, local["manifest"], images, 3)
    assert not np.allclose(direct_topk(plain, local["manifest"], images, 3)[0], probs, atol=1e-4)
    out = load_model("models:/e2e@champion", tracking).predict([png_bytes(i) for i in images],
                                                                params={"top_k": 3})
    assert out["top_k_indices"].tolist() == idx.tolist()
    np.testing.assert_allclose(np.array(out["top_k_probs"].tolist()), probs, atol=1e-5)


def test_promotion_lock_waits_for_a_live_holder_and_takes_over_an_expired_one(local):
    from vitpipe.registry.lock import gate_lock, lock_name

    client = MlflowClient(local["uri"])
    lock = lock_name(NAME)
    client.create_registered_model(lock, tags={"vitpipe.lock.owner": "other-host:1:abc",
                                               "vitpipe.lock.expires": f"{time.time() + 60}"})
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"still held after 1s by other-host:1:abc"), \
            gate_lock(client, NAME, timeout=1):
        pass
    assert time.monotonic() - t0 < 5
    assert client.get_registered_model(lock).tags["vitpipe.lock.owner"] == "other-host:1:abc"

    client.set_registered_model_tag(lock, "vitpipe.lock.expires", f"{time.time() - 1}")  # crashed
    with gate_lock(client, NAME, timeout=5) as owner:
        assert client.get_registered_model(lock).tags["vitpipe.lock.owner"] == owner
    assert not client.search_registered_models(f"name = '{lock}'")  # released
