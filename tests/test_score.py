"""Batch scoring: the registered champion over a folder (one corrupt file), an S3 prefix (out
to S3) and a shard set; rows equal the pyfunc's own predictions; the run is in MLflow."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.test_onnx import NAME, champion  # noqa: F401 - the registered model fixture
from tests.test_registry_support import write_pngs
from vitpipe import storage
from vitpipe.cli import main as cli_main
from vitpipe.config import ScoreConfig
from vitpipe.errors import DataError
from vitpipe.registry.predict import load_model
from vitpipe.score import score


def _cfg(champion, inp: str, out: str, **kw) -> ScoreConfig:  # noqa: F811
    kw = {"batch_size": 8, "num_workers": 2, **kw}
    return ScoreConfig(model=f"models:/{NAME}@champion", input=inp, output=out,
                       progress=False, tracking=champion["tracking"], **kw)


def test_a_folder_with_a_corrupt_image_scores_every_row(champion, tmp_path) -> None:  # noqa: F811
    folder = tmp_path / "in"
    paths = write_pngs(folder / "a", 20)
    (folder / "b").mkdir()
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    res = score(_cfg(champion, str(folder), str(tmp_path / "out" / "p.parquet")))
    assert res["rows"] == 21 and res["errors"] == 1 and res["model_version"] == "1"
    df = pd.read_parquet(tmp_path / "out" / "p.parquet")
    assert len(df) == 21 and set(df["model_version"]) == {"1"}
    bad = df[df["key"] == "b/broken.png"].iloc[0]
    assert bad["error"].startswith("ImageInputError") and pd.isna(bad["label"])
    good = df[df["error"].isna()].sort_values("key")
    served = load_model(f"models:/{NAME}@champion", champion["tracking"]).predict(
        [p.read_bytes() for p in sorted(paths)], params={"top_k": 5})
    assert good["label"].tolist() == served["label"].tolist()
    assert np.allclose(np.stack(good["top_k_probs"]), np.stack(served["top_k_probs"]),
                       atol=1e-5)
    assert np.allclose(np.stack(good["probabilities"]).sum(1), 1, atol=1e-5)
    run = mlflow.MlflowClient(champion["tracking"].uri).get_run(res["run_id"])
    assert run.info.run_name == "score/in" and run.data.tags["vitpipe.model_version"] == "1"
    assert run.data.tags["vitpipe.score_input_digest"] == res["input_digest"]
    assert run.data.metrics["errors"] == 1
    with pytest.raises(DataError, match="no images under"):
        score(_cfg(champion, str(tmp_path / "out"), str(tmp_path / "x.parquet")))


def test_s3_prefix_to_s3_and_a_shard_set(champion, s3_env, tmp_path) -> None:  # noqa: F811
    bucket = s3_env.make_bucket("vp-score")
    paths = write_pngs(tmp_path / "imgs", 12)
    for p in paths:
        storage.upload_file(p, f"{bucket}/incoming/{p.name}")
    res = score(_cfg(champion, f"{bucket}/incoming", f"{bucket}/preds/run1.parquet"))
    assert res["rows"] == 12 and res["errors"] == 0
    local = storage.download_file(f"{bucket}/preds/run1.parquet", tmp_path / "p.parquet")
    assert len(pd.read_parquet(local)) == 12
    # a shard set: the registry fixture's manifest folder holds real shards
    manifest = champion["tmp"] / "shards" / "manifest.json"
    if not manifest.exists():
        manifest = next(champion["tmp"].rglob("manifest.json"))
    from vitpipe.data import read_manifest

    m = read_manifest(str(manifest))
    split = next(iter(m.splits))
    out = tmp_path / "shards.parquet"
    assert cli_main(["score", f"models:/{NAME}@champion", str(manifest), str(out),
                     f"split={split}", f"tracking.uri={champion['tracking'].uri}",
                     "progress=false", "num_workers=0"]) == 0
    df = pd.read_parquet(out)
    assert len(df) == m.splits[split].count and df["error"].isna().all()
    shutil.rmtree(tmp_path / "imgs")


def test_the_score_flow_runs_and_publishes_a_summary(champion, tmp_path) -> None:  # noqa: F811
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_pngs(tmp_path / "in", 6)
    cfg = _cfg(champion, str(tmp_path / "in"), str(tmp_path / "p.parquet"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    code = ("import json, sys; from flows.score import score; from vitpipe.config import "
            "ScoreConfig; print('RESULT', json.dumps(score(ScoreConfig.model_validate_json("
            "sys.argv[1]))))")
    res = subprocess.run([sys.executable, "-c", code, cfg.model_dump_json()],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert out["rows"] == 6 and out["model_version"] == "1"
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 6


def test_every_kind_of_image_scores_as_the_pyfunc_predicts_it(champion, tmp_path) -> None:  # noqa: F811
    """The batch path (native decode, batched transform) must give the pyfunc's numbers for
    whatever users put in a folder: colour JPEGs for a grey model, palette, RGBA and grey +
    alpha PNGs, other sizes, a PNG named .jpg, a BMP; a 16-bit PNG is an error row in both."""
    import io

    from PIL import Image

    from tests.test_registry_support import fmnist_test

    images, _ = fmnist_test(8)
    rng = np.random.default_rng(16)
    folder = tmp_path / "mixed"
    folder.mkdir()

    def save(name: str, img: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        (folder / name).write_bytes(buf.getvalue())

    colour = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    save("a_rgb.jpg", colour, "JPEG", quality=90)
    save("b_rgb.png", colour.resize((28, 28)), "PNG")
    save("c_palette.png", colour.convert("P"), "PNG")
    save("d_rgba.png", colour.convert("RGBA").resize((33, 30)), "PNG")
    save("e_grey_alpha.png", Image.fromarray(images[0]).convert("LA"), "PNG")
    save("f_big_grey.jpg", Image.fromarray(images[1]).resize((64, 64)), "JPEG")
    save("g_png_named.jpg", Image.fromarray(images[2]), "PNG")
    save("h_grey.bmp", Image.fromarray(images[3]), "BMP")
    save("i_16bit.png", Image.fromarray(images[4].astype(np.uint16) * 257), "PNG")
    for i in range(5, 8):
        save(f"j_grey_{i}.png", Image.fromarray(images[i]), "PNG")
    out = tmp_path / "mixed.parquet"
    for workers in (0, 2):
        res = score(_cfg(champion, str(folder), str(out), num_workers=workers, batch_size=5,
                         top_k=10))
        df = pd.read_parquet(out).sort_values("key").reset_index(drop=True)
        paths = sorted(folder.iterdir())
        assert df["key"].tolist() == [p.name for p in paths] and res["rows"] == len(paths)
        served = load_model(f"models:/{NAME}@champion", champion["tracking"]).predict(
            [p.read_bytes() for p in paths], params={"top_k": 10})
        assert df["error"].notna().tolist() == served["error"].notna().tolist()
        assert df["error"].notna().sum() == 1 and res["errors"] == 1
        assert df.loc[df["key"] == "i_16bit.png", "error"].item().startswith("ImageInputError")
        ok = df["error"].isna()
        assert df.loc[ok, "label"].tolist() == served.loc[ok, "label"].tolist()
        assert np.allclose(np.stack(df.loc[ok, "top_k_probs"]),
                           np.stack(served.loc[ok, "top_k_probs"]), atol=1e-6)


def test_decode_workers_leave_the_cores_to_a_cpu_forward() -> None:
    import os

    import torch

    from vitpipe.score import decode_workers

    cores = len(os.sched_getaffinity(0))
    assert decode_workers(None, torch.device("cpu"), 100) == max(0, min(1, cores - 2))
    assert decode_workers(None, torch.device("cuda"), 100) == max(0, min(8, cores - 1))
    assert decode_workers(6, torch.device("cpu"), 100) == 6
    assert decode_workers(6, torch.device("cpu"), 2) == 2  # no idle processes
    assert decode_workers(0, torch.device("cuda"), 100) == 0
