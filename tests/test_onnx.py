"""ONNX export of a registered model: onnxruntime's logits equal the pyfunc's within 1e-4 on
real Fashion-MNIST test images, for any batch size; the preprocessing is in the metadata; the
registration logged the same graph beside the pyfunc."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.test_registry_support import (
    eval_digest_of,
    fmnist_test,
    log_training_run,
    make_manifest,
    png_bytes,
    write_pngs,
)
from vitpipe.cli import main as cli_main
from vitpipe.config import RegisterConfig, TrackingConfig
from vitpipe.errors import VitpipeError
from vitpipe.registry import register
from vitpipe.registry.onnx_export import check_against_pyfunc, export_onnx
from vitpipe.registry.predict import load_model

NAME = "onnx-vit"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    manifest = make_manifest(tmp)
    rid, _ = log_training_run(uri, manifest, tmp, seed=3, top1=0.7,
                              eval_digest=eval_digest_of(manifest))
    tracking = TrackingConfig(uri=uri)
    reg = register(RegisterConfig(model_name=NAME, run_id=rid, tracking=tracking))
    return {"tmp": tmp, "tracking": tracking, "run_id": rid, "reg": reg}


def test_onnx_logits_equal_the_pyfunc_on_real_images(champion, tmp_path) -> None:
    out = tmp_path / "m.onnx"
    info = export_onnx(f"models:/{NAME}@champion", out, champion["tracking"])
    assert info["input_shape"] == ["batch", 1, 28, 28] and len(info["classes"]) == 10
    images, _ = fmnist_test(64)
    pngs = [png_bytes(img) for img in images]
    assert check_against_pyfunc(f"models:/{NAME}@champion", out, pngs,
                                champion["tracking"]) <= 1e-4
    # dynamic batch: 1, 7 and 64 images, each row as the pyfunc's network gives it
    clf = load_model(f"models:/{NAME}@champion", champion["tracking"]).unwrap_python_model()
    x = torch.stack([clf._preprocess(p) for p in pngs])
    with torch.inference_mode():
        ref = clf.model(x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):
        got = sess.run(["logits"], {"pixels": x[:n].numpy()})[0]
        assert got.shape == (n, 10) and np.abs(got - ref[:n]).max() <= 1e-4
    # the probabilities the pyfunc serves are softmax(onnx logits)
    served = clf.predict(None, list(pngs[:5]))
    top = np.exp(got[:5]) / np.exp(got[:5]).sum(-1, keepdims=True)
    assert [int(i[0]) for i in served["top_k_indices"]] == top.argmax(-1).tolist()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["vitpipe.classes"]) == clf.classes
    assert json.loads(meta["vitpipe.mean"]) == clf.mean and meta["vitpipe.channel_mode"] == "L"
    assert "centre crop to 28x28" in meta["vitpipe.preprocess"]
    # a wrong graph is caught by the check
    bad = tmp_path / "bad.onnx"
    from vitpipe.registry.onnx_export import write_onnx

    net = load_model(f"models:/{NAME}@champion", champion["tracking"]).unwrap_python_model()
    with torch.no_grad():
        net.model.head.bias.add_(1.0)
    write_onnx(net.model, net.input_shape, {}, bad)
    with pytest.raises(VitpipeError, match="differ from the pyfunc"):
        check_against_pyfunc(f"models:/{NAME}@champion", bad, pngs[:4], champion["tracking"])


def test_registration_logs_onnx_beside_the_pyfunc_and_the_cli_exports(champion,
                                                                        tmp_path) -> None:
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"runs:/{champion['run_id']}/onnx/model.onnx", dst_path=str(tmp_path),
        tracking_uri=champion["tracking"].uri)
    meta = {p.key: p.value for p in onnx.load(local).metadata_props}
    assert meta["vitpipe.model_uri"] == f"runs:/{champion['run_id']}/model"
    images = write_pngs(tmp_path / "imgs", 3)
    out = tmp_path / "cli.onnx"
    assert cli_main(["export-onnx", f"models:/{NAME}/1", str(out), "--check",
                     *map(str, images), "--tracking-uri", champion["tracking"].uri]) == 0
    a = ort.InferenceSession(local, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    assert np.abs(a.run(None, {"pixels": x})[0] - b.run(None, {"pixels": x})[0]).max() <= 1e-5
