"""Registration against a real MLflow server (SQLite + SeaweedFS S3 artifacts): the gate over
three versions, lineage tags, a fresh process predicting @champion on real Fashion-MNIST PNGs,
and a real ``mlflow models serve`` answering HTTP with per-row errors for bad images."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.test_registry_support import (
    direct_topk,
    eval_digest_of,
    fmnist_test,
    log_training_run,
    make_manifest,
    png_bytes,
    write_pngs,
)
from vitpipe.config import RegisterConfig, TrackingConfig
from vitpipe.registry import promote, register
from vitpipe.registry.gate import Contender
from vitpipe.stack.mlflow_server import start_model_server

pytestmark = pytest.mark.integration

NAME = "fmnist-tiny"
N_IMAGES = 16


@pytest.fixture(scope="module")
def world(mlflow_server, tmp_path_factory):
    """Three registrations: v1 0.80 (first: promoted), v2 0.85 (better: promoted),
    v3 0.84 (worse: stays challenger)."""
    tmp = tmp_path_factory.mktemp("registry-server")
    manifest = make_manifest(tmp)
    digest = eval_digest_of(manifest)
    uri = mlflow_server.uri
    out = {"uri": uri, "manifest": manifest, "tmp": tmp, "models": {}, "results": [],
           "runs": [], "digest": digest}
    old = os.environ.get("PREFECT__FLOW_RUN_ID")
    os.environ["PREFECT__FLOW_RUN_ID"] = "flow-run-123"
    try:
        for seed, top1 in ((1, 0.80), (2, 0.85), (3, 0.84)):
            rid, model = log_training_run(uri, manifest, tmp, seed=seed, top1=top1,
                                          eval_digest=digest)
            res = register(RegisterConfig(model_name=NAME, run_id=rid, top_k=3,
                                          tracking=TrackingConfig(uri=uri)))
            out["models"][res["version"]] = model
            out["results"].append(res)
            out["runs"].append(rid)
    finally:
        if old is None:
            os.environ.pop("PREFECT__FLOW_RUN_ID", None)
        else:
            os.environ["PREFECT__FLOW_RUN_ID"] = old
    return out


def test_gate_promotes_better_and_keeps_champion_against_worse(world):
    r1, r2, r3 = world["results"]
    assert (r1["promoted"], r2["promoted"], r3["promoted"]) == (True, True, False)
    assert r1["previous_champion"] is None and r2["previous_champion"] == r1["version"]
    assert r3["previous_champion"] == r2["version"]
    assert "does not beat" in r3["decision"]["reason"]
    assert r3["decision"]["candidate_value"] == 0.84 and r3["decision"]["champion_value"] == 0.85
    client = MlflowClient(world["uri"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == r2["version"]
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == r3["version"]
    for res in (r1, r2, r3):  # every decision recorded on its version
        mv = client.get_model_version(NAME, res["version"])
        assert mv.tags["vitpipe.gate.promoted"] == str(res["promoted"]).lower()
        assert mv.tags["vitpipe.gate.previous_champion"] == (res["previous_champion"] or "")
        assert mv.tags["vitpipe.gate.reason"] == res["decision"]["reason"]
        assert mv.tags["vitpipe.gate.metric"] == "test_top1"
        assert ("Promoted to champion" if res["promoted"] else "Not promoted") in mv.description
    assert not client.search_registered_models(f"name = '{NAME}.gate-lock'")  # lock released


def test_version_lineage_tags(world):
    client = MlflowClient(world["uri"])
    res, rid = world["results"][0], world["runs"][0]
    mv = client.get_model_version(NAME, res["version"])
    from vitpipe.data import read_manifest

    assert mv.run_id == rid
    assert mv.tags["vitpipe.training_run_id"] == rid
    assert mv.tags["vitpipe.dataset_digest"] == str(read_manifest(str(world["manifest"])).digest)
    assert mv.tags["vitpipe.eval_digest"] == world["digest"]
    assert mv.tags["vitpipe.git_commit"] == "0" * 40
    assert mv.tags["vitpipe.prefect_flow_run_id"] == "flow-run-123"
    assert float(mv.tags["vitpipe.metric.test_top1"]) == 0.80
    assert len(mv.tags["vitpipe.weights_sha256"]) == 64
    assert not any("secret" in k.lower() or "access_key" in k.lower() for k in mv.tags)


def test_model_artifacts_live_in_s3_as_safetensors(world, s3_server):
    keys = [o["Key"] for page in s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket="mlflow") for o in page.get("Contents", [])]
    weights = [k for k in keys if k.endswith("model.safetensors")]
    # per run: the training run's weights + the copy inside the registered pyfunc
    assert len([k for k in weights if "/artifacts/" in k]) >= 6, keys[:20]
    assert not [k for k in keys if k.endswith((".pt", ".pth", ".bin"))]


def test_fresh_process_predicts_champion_on_real_fmnist_pngs(world, tmp_path):
    pngs = write_pngs(tmp_path / "pngs", N_IMAGES)
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"]}
    proc = subprocess.run(
        [sys.executable, "-m", "vitpipe.cli", "predict", f"models:/{NAME}@champion",
         *map(str, pngs), "--top-k", "3", "--json"],
        capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    champion = world["models"][world["results"][1]["version"]]
    images, _ = fmnist_test(N_IMAGES)
    probs, idx = direct_topk(champion, world["manifest"], images, 3)
    assert [r["file"] for r in rows] == [str(p) for p in pngs]
    got_idx = np.array([[t["index"] for t in r["top_k"]] for r in rows])
    got_p = np.array([[t["prob"] for t in r["top_k"]] for r in rows])
    np.testing.assert_array_equal(got_idx, idx)
    np.testing.assert_allclose(got_p, probs, atol=1e-5)
    assert all(r["error"] is None and r["label"] for r in rows)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    server = start_model_server(f"models:/{NAME}@champion", world["uri"],
                                tmp_path_factory.mktemp("serve"))
    try:
        yield server
    finally:
        server.stop()


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_served_model_answers_base64_batches_with_per_row_errors(world, served):
    images, _ = fmnist_test(N_IMAGES)
    b64 = [base64.b64encode(png_bytes(img)).decode() for img in images[:6]]
    garbage = base64.b64encode(b"definitely not a png").decode()
    truncated = base64.b64encode(png_bytes(images[6])[:40]).decode()
    rows = [b64[0], garbage, b64[1], "%%% not base64 %%%", b64[2], truncated, *b64[3:]]
    status, body = _post(served.invocations_url,
                         {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}})
    assert status == 200, body
    preds = body["predictions"]
    assert len(preds) == len(rows)
    bad = {1: "does not decode", 3: "neither an existing file path nor valid base64",
           5: "does not decode"}
    for i, msg in bad.items():
        assert preds[i]["error"].startswith(f"row {i}:") and msg in preds[i]["error"]
        assert preds[i]["label"] is None
    good = [p for i, p in enumerate(preds) if i not in bad]
    champion = world["models"][world["results"][1]["version"]]
    probs, idx = direct_topk(champion, world["manifest"], images[:6], 3)
    assert [p["top_k_indices"] for p in good] == idx.tolist()
    np.testing.assert_allclose([p["top_k_probs"] for p in good], probs, atol=1e-5)
    assert all(p["error"] is None for p in good)

    # the same images as "inputs" (a list) and as "dataframe_records", top_k as a param
    for payload in ({"inputs": b64}, {"dataframe_records": [{"image": x} for x in b64]}):
        status, body = _post(served.invocations_url, {**payload, "params": {"top_k": 2}})
        assert status == 200, body
        assert [p["top_k_indices"] for p in body["predictions"]] == idx[:, :2].tolist()

    # the server is still healthy after the bad rows
    with urllib.request.urlopen(served.url + "/ping", timeout=10) as r:
        assert r.status == 200


def test_racing_promotions_end_with_the_best_champion_and_a_linear_history(world):
    """Two gates run at the same instant (barrier) for two candidates that both beat the
    champion: the better one must end as champion, and the recorded decisions must form one
    chain (never two promotions over the same previous champion)."""
    uri = world["uri"]
    client = MlflowClient(uri)
    name = "race-tiny"
    cfg = RegisterConfig(model_name=name, tracking=TrackingConfig(uri=uri))
    source, rid = world["results"][0]["logged_model_uri"], world["runs"][0]
    client.create_registered_model(name)

    def new_version(value: float) -> Contender:
        mv = client.create_model_version(name, source, run_id=rid,
                                         model_id=source.removeprefix("models:/"))
        return Contender(str(mv.version), value, world["digest"])

    champion = new_version(0.50)
    assert promote(client, cfg, champion).promoted
    for rnd, (va, vb) in enumerate(((0.70, 0.65), (0.75, 0.80))):
        a, b = new_version(va), new_version(vb)
        barrier = threading.Barrier(2)
        decisions: dict[str, object] = {}

        def run(c: Contender, barrier: threading.Barrier, out: dict) -> None:
            barrier.wait()
            out[c.version] = promote(MlflowClient(uri), cfg, c)

        threads = [threading.Thread(target=run, args=(c, barrier, decisions)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        best, other = (a, b) if va > vb else (b, a)
        final = str(client.get_model_version_by_alias(name, "champion").version)
        assert final == best.version, (rnd, decisions)
        db, do = decisions[best.version], decisions[other.version]
        assert db.promoted
        if do.promoted:  # the worse one went first: the better one must have replaced it
            assert do.previous_champion == champion.version
            assert db.previous_champion == other.version
        else:
            assert db.previous_champion == champion.version
            assert do.previous_champion == best.version and "does not beat" in do.reason
        for c in (a, b):  # what was recorded on the versions matches what was returned
            mv = client.get_model_version(name, c.version)
            recorded = mv.tags["vitpipe.gate.previous_champion"]
            assert recorded == decisions[c.version].previous_champion
        champion = best


def test_score_and_onnx_export_of_the_champion_through_the_server(world, tmp_path):
    """What registry consumers do next, against the server: batch scoring of @champion into
    Parquet (its run on the server, naming the version) and an ONNX export equal to the
    pyfunc on real images."""
    import pandas as pd

    from vitpipe.config import ScoreConfig
    from vitpipe.registry.onnx_export import check_against_pyfunc, export_onnx
    from vitpipe.score import score

    uri, tracking = f"models:/{NAME}@champion", TrackingConfig(uri=world["uri"])
    champion = MlflowClient(world["uri"]).get_model_version_by_alias(NAME, "champion").version
    paths = write_pngs(tmp_path / "in", N_IMAGES)
    res = score(ScoreConfig(model=uri, input=str(tmp_path / "in"),
                            output=str(tmp_path / "p.parquet"), batch_size=5, progress=False,
                            tracking=tracking))
    df = pd.read_parquet(tmp_path / "p.parquet")
    assert len(df) == len(paths) and df["error"].isna().all()
    assert res["model_version"] == str(champion) and set(df["model_version"]) == {champion}
    run = MlflowClient(world["uri"]).get_run(res["run_id"])
    assert run.data.tags["vitpipe.model_version"] == str(champion)
    out = tmp_path / "m.onnx"
    export_onnx(uri, out, tracking)
    pngs = [p.read_bytes() for p in paths]
    assert check_against_pyfunc(uri, out, pngs, tracking) <= 1e-4
