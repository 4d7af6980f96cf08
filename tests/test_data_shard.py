"""The shard stage on real data: idempotency, overwrite, formats, ImageFolder, interruption,
the CLI, and the full Fashion-MNIST counts."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.test_data_support import FMNIST, fmnist_cfg, make_imagefolder
from vitpipe.cli import main
from vitpipe.config import ShardConfig
from vitpipe.data import make_loader, read_manifest, shard
from vitpipe.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_idempotent_then_overwrite_rebuilds(tmp_path, caplog):
    out = tmp_path / "fm"
    cfg = fmnist_cfg(out, limit=300, per_shard=100)
    uri = shard(cfg)
    before = _mtimes(out)
    with caplog.at_level(logging.INFO, logger="vitpipe.data.writer"):
        assert shard(cfg) == uri
    assert "up to date" in caplog.text and "nothing to do" in caplog.text
    assert _mtimes(out) == before  # nothing rewritten

    changed = cfg.model_copy(update={"max_samples_per_shard": 60})
    with pytest.raises(DataError, match="different settings.*overwrite"):
        shard(changed)
    assert read_manifest(uri).config["max_samples_per_shard"] == 100
    shard(changed.model_copy(update={"overwrite": True}))
    m = read_manifest(uri)
    assert [s.count for s in m.splits["train"].shards] == [60, 60, 60, 60, 10]
    listed = {s.name for sp in m.splits.values() for s in sp.shards} | {"manifest.json"}
    assert {p.name for p in out.iterdir()} == listed  # old shards removed


def test_jpeg_option_and_byte_limit(tmp_path):
    cfg = fmnist_cfg(tmp_path / "j", limit=200, per_shard=1000, image_format="jpeg",
                     jpeg_quality=75, max_bytes_per_shard=40_000, val_fraction=0)
    m = read_manifest(shard(cfg))
    train = m.splits["train"]
    assert train.count == 200 and len(train.shards) > 1  # split by bytes
    assert all(s.name.startswith("train-00000-") for s in train.shards)
    with tarfile.open(m.shard_urls("train")[0]) as tf:
        names = tf.getnames()
        img = Image.open(tf.extractfile(next(n for n in names if n.endswith(".jpg"))))
        assert img.format == "JPEG" and img.mode == "L" and img.size == (28, 28)
    assert m.image_format == "jpg" and m.channels == 1
    x, y = next(iter(make_loader(m.uri, "train", 8, num_workers=0)))
    assert x.shape == (8, 1, 28, 28)


def test_imagefolder_colour_source(tmp_path):
    train = make_imagefolder(tmp_path / "train", {"zebra": 7, "ant": 5, "cat": 6}, fmt="JPEG")
    test = make_imagefolder(tmp_path / "test", {"ant": 2, "cat": 2, "zebra": 2}, seed=1)
    Image.new("L", (20, 16), 128).save(train / "cat" / "gray.png")  # converted to RGB
    cfg = ShardConfig.model_validate({
        "source": {"kind": "imagefolder", "path": str(train), "test_path": str(test)},
        "output": f"file://{tmp_path / 'out'}", "image_format": "keep", "val_fraction": 0.2,
        "max_samples_per_shard": 4, "workers": 2})
    m = read_manifest(shard(cfg))
    assert m.classes == ["ant", "cat", "zebra"] and m.channels == 3
    assert {k: v.count for k, v in m.splits.items()} == {"train": 15, "val": 4, "test": 6}
    assert m.splits["test"].class_counts == [2, 2, 2]
    assert m.image_size == (16, 20) and m.image_format == "jpg+png"
    with tarfile.open(str(m.shard_urls("test")[0]).removeprefix("file://")) as tf:
        member = next(n for n in tf.getnames() if n.endswith(".png"))
        assert tf.extractfile(member).read() == (
            test / (member.removesuffix("_png.png") + ".png")).read_bytes()
    x, y, keys = next(iter(make_loader(m.uri, "test", 6, num_workers=0, train=False,
                                       with_keys=True)))
    assert x.shape == (6, 3, 16, 20) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert keys[0].split("/")[0] in m.classes


def test_interrupted_run_leaves_nothing_readable_and_rerun_completes(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vitpipe.cli", "shard", "source.limit_per_split=4000",
           f"output={out}", "max_samples_per_shard=100", "workers=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not list(out.glob("*.tar")):
            assert proc.poll() is None, "shard finished before it could be interrupted"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    tars = list(out.glob("*.tar"))
    assert tars, "no shard was written before the kill"
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(str(out))
    for t in tars:  # any file with a shard's name is a complete shard
        with tarfile.open(t) as tf:
            assert len(tf.getnames()) == 300  # 100 samples: .png, .cls, .crc
    uri = shard(fmnist_cfg(out, limit=4000, per_shard=100))
    assert read_manifest(uri).splits["test"].count == 4000
    assert not list(out.glob(".*tmp*")) or all(
        time.time() - p.stat().st_mtime < 60 for p in out.glob(".*tmp*"))


def test_cli_shard(tmp_path, capsys):
    rc = main(["shard", "source.limit_per_split=120", f"output={tmp_path / 'c'}", "workers=1"])
    assert rc == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert uri == str(tmp_path / "c" / "manifest.json")
    assert read_manifest(uri).splits["test"].count == 120


@pytest.mark.slow
def test_full_fashion_mnist_counts(tmp_path):
    t0 = time.monotonic()
    cfg = ShardConfig.model_validate({"source": {"path": FMNIST}, "output": str(tmp_path / "f"),
                                      "val_fraction": 1 / 12, "max_samples_per_shard": 10_000,
                                      "workers": 2})
    m = read_manifest(shard(cfg))
    counts = {k: v.count for k, v in m.splits.items()}
    assert counts == {"train": 55_000, "val": 5_000, "test": 10_000}
    assert m.source.counts == {"train": 60_000, "test": 10_000}
    assert m.splits["test"].class_counts == [1000] * 10
    assert [round(v, 3) for v in m.mean + m.std] == pytest.approx([0.286, 0.353], abs=0.002)
    print(f"full Fashion-MNIST sharded in {time.monotonic() - t0:.1f}s")
