"""Bad input: a clear error naming the shard/path, or a counted skip; never a hang."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_data_support import (
    copy_shards,
    make_imagefolder,
    refresh_manifest,
    rewrite_tar,
    small_fmnist,
)
from vitpipe.config import ShardConfig
from vitpipe.data import make_loader, read_manifest, shard
from vitpipe.errors import DataError

pytestmark = pytest.mark.timeout(120)
SHARD = "train-00001-00.tar"


@pytest.fixture
def shards(tmp_path_factory, tmp_path) -> str:
    return copy_shards(small_fmnist(tmp_path_factory), tmp_path / "shards")


def _corrupt_images(manifest: str, name: str, n: int) -> list[str]:
    """Replace the first ``n`` images of shard ``name`` with garbage; returns their keys."""
    keys: list[str] = []

    def edit(members):
        out = []
        for ti, data in members:
            if ti.name.endswith(".png") and len(keys) < n:
                keys.append(ti.name[:-4])
                data = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
            out.append((ti, data))
        return out

    rewrite_tar(Path(manifest).parent / name, edit)
    refresh_manifest(manifest)
    return keys


def _drain(loader) -> list:
    return list(loader)


def test_corrupt_image_is_skipped_counted_and_logged(shards, caplog):
    keys = _corrupt_images(shards, SHARD, 1)
    with caplog.at_level(logging.WARNING, logger="vitpipe.data.loader"):
        loader = make_loader(shards, "train", 16, num_workers=0, max_bad_fraction=0.01)
        batches = _drain(loader)
    assert len(batches) == len(loader) == 500 // 16
    assert all(x.shape[0] == 16 for x, _ in batches)
    assert loader.bad_samples == 1
    assert any(SHARD in r.getMessage() and keys[0] in r.getMessage() for r in caplog.records)
    # evaluation: the bad sample becomes a -1 pad; everything else is seen once
    ev = make_loader(shards, "train", 64, num_workers=2, train=False, max_bad_fraction=0.01)
    labels = torch.cat([y for _, y in ev])
    assert int((labels >= 0).sum()) == 499 and int((labels < 0).sum()) == 1
    assert ev.bad_samples == 1


def test_too_many_corrupt_images_stop_with_the_worst_shard(shards):
    _corrupt_images(shards, SHARD, 10)
    loader = make_loader(shards, "train", 16, num_workers=2, max_bad_fraction=0.001)
    with pytest.raises(DataError, match=f"too many bad samples.*{SHARD}") as err:
        _drain(loader)
    assert "Traceback" not in str(err.value)


def _truncate(manifest: str, name: str, keep: float, refresh: bool) -> None:
    p = Path(manifest).parent / name
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    if refresh:
        refresh_manifest(manifest)


@pytest.mark.parametrize("refresh", [False, True])
def test_truncated_shard_names_the_shard(shards, refresh):
    _truncate(shards, SHARD, 0.5, refresh)
    loader = make_loader(shards, "train", 50, num_workers=2, train=False)
    with pytest.raises(DataError, match=SHARD) as err:
        _drain(loader)
    assert "truncated" in str(err.value) or "ended after" in str(err.value)


def test_truncated_shard_is_a_counted_skip_when_allowed(shards):
    _truncate(shards, SHARD, 0.7, refresh=True)  # the tail of the shard is lost
    loaders = [make_loader(shards, "train", 16, r, 2, num_workers=2, max_bad_fraction=1.0)
               for r in range(2)]
    counts = [len(_drain(ld)) for ld in loaders]
    assert counts == [500 // 32] * 2  # equal batch counts despite the lost samples
    assert sum(ld.bad_samples for ld in loaders) > 0
    ev = [make_loader(shards, "train", 64, r, 2, num_workers=2, train=False, max_bad_fraction=1.0)
          for r in range(2)]
    labels = torch.cat([y for ld in ev for _, y in ld])
    assert int((labels >= 0).sum()) + sum(ld.bad_samples for ld in ev) == 500


def test_shard_with_only_bad_samples_for_a_worker_says_so(shards):
    _truncate(shards, SHARD, 0.5, refresh=False)  # wrong size: the whole shard is unusable
    loaders = [make_loader(shards, "train", 16, r, 2, num_workers=2, max_bad_fraction=1.0)
               for r in range(2)]
    with pytest.raises(DataError, match=f"is bad: {SHARD}.*truncated or replaced"):
        for ld in loaders:
            _drain(ld)


@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 100], ids=["empty", "junk"])
def test_empty_or_non_tar_shard(shards, content):
    (Path(shards).parent / SHARD).write_bytes(content)
    refresh_manifest(shards)
    with pytest.raises(DataError, match=f"{SHARD}.*(not a readable tar|empty)"):
        _drain(make_loader(shards, "train", 50, num_workers=2, train=False))


def test_tar_without_members_is_reported(shards):
    rewrite_tar(Path(shards).parent / SHARD, lambda members: [])
    refresh_manifest(shards)
    with pytest.raises(DataError, match=f"{SHARD}.*ended after 0 samples"):
        _drain(make_loader(shards, "train", 50, num_workers=0, train=False))


@pytest.mark.parametrize("bad_name", ["/etc/evil.png", "../evil.png", "a/../../evil.png"])
def test_member_with_unsafe_path_is_refused(shards, bad_name):
    def edit(members):
        ti, data = members[0]
        ti.name = bad_name
        return [(ti, data), *members[1:]]

    rewrite_tar(Path(shards).parent / SHARD, edit)
    refresh_manifest(shards)
    loader = make_loader(shards, "train", 50, num_workers=2, train=False, max_bad_fraction=1.0)
    with pytest.raises(DataError, match=f"{SHARD}.*absolute or '..' path"):
        _drain(loader)


def test_sha256_mismatch_names_the_shard(shards):
    p = Path(shards).parent / SHARD
    data = bytearray(p.read_bytes())
    data[2000] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{SHARD} has sha256"):
        make_loader(shards, "train", 16, num_workers=0, verify_sha256=True)
    assert read_manifest(shards).splits["train"].count == 500


def test_source_folder_without_images(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "notes.txt").write_text("no images here")
    cfg = ShardConfig.model_validate({"source": {"kind": "imagefolder",
                                                 "path": str(tmp_path / "src")},
                                      "output": str(tmp_path / "out")})
    with pytest.raises(DataError, match=f"no images found under {tmp_path / 'src'}"):
        shard(cfg)
    (tmp_path / "empty").mkdir()
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(
        update={"path": str(tmp_path / "empty")})})
    with pytest.raises(DataError, match=f"no class folders in {tmp_path / 'empty'}"):
        shard(cfg)


@pytest.mark.parametrize("kind", ["mode", "corrupt"])
def test_bad_source_image_names_its_path(tmp_path, kind):
    root = make_imagefolder(tmp_path / "src", {"a": 3, "b": 3})
    bad = root / "b" / ("deep.tif" if kind == "mode" else "broken.png")
    if kind == "mode":
        Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(bad)
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    cfg = ShardConfig.model_validate({"source": {"kind": "imagefolder", "path": str(root)},
                                      "output": str(tmp_path / "out"), "val_fraction": 0,
                                      "workers": 2, "max_samples_per_shard": 2})
    with pytest.raises(DataError, match=str(bad)) as err:
        shard(cfg)
    assert ("unsupported mode 'F'" if kind == "mode" else "corrupt") in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
