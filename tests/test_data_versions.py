"""Dataset versions: a grown ImageFolder source -> new shards for the new images only, a
manifest whose parent is the old one, a fixed test holdout; changed images re-shard whole."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitpipe import storage
from vitpipe.config import ShardConfig
from vitpipe.data import make_loader, read_manifest, shard
from vitpipe.data.versions import diff, goes_to_val
from vitpipe.errors import DataError

CLASSES = ("ankle", "bag")


def _add_images(root: Path, start: int, n: int) -> None:
    """``n`` distinct 12x12 gray PNGs per class, numbered from ``start``."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            px = np.random.default_rng([c, i]).integers(0, 256, (12, 12), dtype=np.uint8)
            Image.fromarray(px, "L").save(root / name / f"img{i:04d}.png")


def _cfg(tmp: Path, out: str | None = None, **kw) -> ShardConfig:
    return ShardConfig(source={"kind": "imagefolder", "path": str(tmp / "src" / "train"),
                               "test_path": str(tmp / "src" / "test")},
                       output=out or str(tmp / "shards"), val_fraction=0.2,
                       max_samples_per_shard=16, workers=1, **kw)


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def _keys(uri: str, split: str) -> list[str]:
    keys: list[str] = []
    for _x, _y, k in make_loader(uri, split, 1, num_workers=0, train=False, with_keys=True):
        keys += list(k)
    return keys


def test_diff_says_what_changed() -> None:
    old = {"train": {"a/1": "0:10:1", "a/2": "0:10:1"}, "test": {"a/9": "0:10:1"}}
    grown = {"train": {**old["train"], "a/3": "0:11:2"}, "test": {**old["test"], "b/8": "1:9:3"}}
    ch = diff(old, grown, grow_test=False)
    assert ch.rebuild is None and ch.added == {"train": ["a/3"]} and ch.ignored == {"test": 1}
    assert diff(old, grown, grow_test=True).added == {"train": ["a/3"], "test": ["b/8"]}
    edited = {**grown, "train": {**grown["train"], "a/1": "0:12:5"}}
    assert "1 changed" in diff(old, edited, grow_test=False).rebuild
    gone = {**grown, "train": {"a/1": "0:10:1"}}
    assert "1 image(s) removed" in diff(old, gone, grow_test=False).rebuild
    assert "no source index" in diff(None, grown, grow_test=False).rebuild
    assert diff(old, old, grow_test=False).count == 0
    # the val choice for a new image is a pure function of its key
    picks = [goes_to_val(f"a/{i}", 0, 0.2) for i in range(2000)]
    assert picks == [goes_to_val(f"a/{i}", 0, 0.2) for i in range(2000)]
    assert 0.15 < np.mean(picks) < 0.25


def test_a_grown_source_appends_new_shards_and_keeps_the_test_holdout(tmp_path, caplog) -> None:
    _add_images(tmp_path / "src" / "train", 0, 40)
    _add_images(tmp_path / "src" / "test", 0, 10)
    out = tmp_path / "shards"
    uri = shard(_cfg(tmp_path))
    v1 = read_manifest(uri)
    assert v1.version == 1 and v1.parent is None and v1.index
    before = _files(out)
    train_v1, val_v1 = set(_keys(uri, "train")), set(_keys(uri, "val"))

    _add_images(tmp_path / "src" / "train", 40, 12)  # 24 new train images
    _add_images(tmp_path / "src" / "test", 10, 2)  # 4 new test images: left out
    with caplog.at_level(logging.INFO, logger="vitpipe.data.writer"):
        assert shard(_cfg(tmp_path)) == uri
    v2 = read_manifest(uri)
    assert "left out 4 new image(s) of source split(s) test" in caplog.text
    assert "dataset version 2" in caplog.text
    assert v2.version == 2 and v2.parent == v1.digest and v2.digest != v1.digest
    assert read_manifest(str(out / f"manifest-{v1.digest}.json")).digest == v1.digest
    after = _files(out)
    assert {k: after[k] for k in before} == before  # every old shard untouched, reused
    new = set(after) - set(before)
    new_names = [s.name for sp in v2.splits.values() for s in sp.shards if s.name in new]
    assert sorted(new_names) == sorted(new)
    added = sum(s.count for sp in v2.splits.values() for s in sp.shards if s.name in new)
    assert added == 24  # only the new images were written
    assert v2.splits["test"] == v1.splits["test"]  # the holdout: same shards, same digest
    assert v2.splits["train"].count + v2.splits["val"].count == 80 + 24
    assert v2.splits["train"].mean == v1.splits["train"].mean  # the parent's input scaling
    train_v2, val_v2 = set(_keys(uri, "train")), set(_keys(uri, "val"))
    assert train_v1 <= train_v2 and val_v1 <= val_v2 and not train_v2 & val_v2
    assert len(train_v2 | val_v2) == 104
    assert sum(v2.splits["train"].class_counts) == v2.splits["train"].count

    # nothing changed: nothing written, the same manifest
    text = storage.read_text(uri)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitpipe.data.writer"):
        shard(_cfg(tmp_path))
    assert storage.read_text(uri) == text and "nothing to do" in caplog.text

    # the user asks the test split to grow: the 4 left-out images join it
    shard(_cfg(tmp_path, grow_test=True))
    v3 = read_manifest(uri)
    assert v3.version == 3 and v3.parent == v2.digest
    assert v3.splits["test"].count == v2.splits["test"].count + 4
    assert set(_keys(uri, "test")) >= set(_keys(str(out / f"manifest-{v2.digest}.json"),
                                                 "test"))

    # an edited image cannot be appended: the whole source is re-sharded as version 4
    img = tmp_path / "src" / "train" / "bag" / "img0003.png"
    Image.fromarray(np.zeros((12, 12), np.uint8), "L").save(img)
    os.utime(img, ns=(1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitpipe.data.writer"):
        shard(_cfg(tmp_path, grow_test=True))
    v4 = read_manifest(uri)
    assert "1 changed" in caplog.text and "re-sharding it whole as version 4" in caplog.text
    assert v4.version == 4 and v4.parent == v3.digest
    assert v4.splits["train"].count + v4.splits["val"].count == 104


def test_refuse_keeps_the_old_behaviour_and_a_new_class_reshards(tmp_path) -> None:
    _add_images(tmp_path / "src" / "train", 0, 20)
    _add_images(tmp_path / "src" / "test", 0, 4)
    uri = shard(_cfg(tmp_path))
    _add_images(tmp_path / "src" / "train", 20, 2)
    with pytest.raises(DataError, match="on_source_change=refuse"):
        shard(_cfg(tmp_path, on_source_change="refuse"))
    assert read_manifest(uri).version == 1  # nothing lost
    (tmp_path / "src" / "train" / "coat").mkdir()
    Image.fromarray(np.zeros((12, 12), np.uint8), "L").save(
        tmp_path / "src" / "train" / "coat" / "a.png")
    shard(_cfg(tmp_path))
    m = read_manifest(uri)
    assert m.version == 2 and m.classes == ["ankle", "bag", "coat"]


def test_versions_on_s3(s3_env, tmp_path) -> None:
    bucket = s3_env.make_bucket("vp-versions")
    _add_images(tmp_path / "src" / "train", 0, 20)
    _add_images(tmp_path / "src" / "test", 0, 4)
    uri = shard(_cfg(tmp_path, f"{bucket}/ds"))
    v1 = read_manifest(uri)
    _add_images(tmp_path / "src" / "train", 20, 5)
    shard(_cfg(tmp_path, f"{bucket}/ds"))
    v2 = read_manifest(uri)
    assert v2.version == 2 and v2.parent == v1.digest
    assert v2.splits["train"].count + v2.splits["val"].count == 50
    assert storage.exists(f"{bucket}/ds/manifest-{v1.digest}.json")
    assert len(_keys(uri, "train")) == v2.splits["train"].count


def test_a_grown_s3_prefix_appends_new_shards(s3_env, tmp_path) -> None:
    """The source an S3 prefix of ``<class>/<image>`` objects, read with boto3."""
    bucket = s3_env.make_bucket("vp-source")

    def upload(split: str, start: int, n: int) -> None:
        local = tmp_path / f"up-{split}-{start}"
        _add_images(local, start, n)
        for p in sorted(local.rglob("*.png")):
            storage.upload_file(p, f"{bucket}/images/{split}/{p.parent.name}/{p.name}")

    upload("train", 0, 20)
    upload("test", 0, 4)
    cfg = ShardConfig(source={"kind": "imagefolder", "path": f"{bucket}/images/train",
                              "test_path": f"{bucket}/images/test"},
                      output=str(tmp_path / "shards"), val_fraction=0.2,
                      max_samples_per_shard=16, workers=2)
    uri = shard(cfg)
    v1 = read_manifest(uri)
    assert v1.classes == list(CLASSES) and v1.splits["test"].count == 8
    assert v1.splits["train"].count + v1.splits["val"].count == 40
    before = _files(tmp_path / "shards")
    upload("train", 20, 3)
    shard(cfg)
    v2 = read_manifest(uri)
    assert v2.version == 2 and v2.parent == v1.digest
    after = _files(tmp_path / "shards")
    assert {k: after[k] for k in before} == before
    assert sum(s.count for sp in v2.splits.values() for s in sp.shards
               if s.name not in before) == 6
    assert len(_keys(uri, "train")) + len(_keys(uri, "val")) == 46
    with pytest.raises(DataError, match="no images under"):
        shard(cfg.model_copy(update={"source": cfg.source.model_copy(
            update={"path": f"{bucket}/nothing"}), "output": str(tmp_path / "other")}))
