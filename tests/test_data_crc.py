"""Per-sample integrity on by default: ``vitpipe shard`` writes a ``.crc`` member per sample and
the loader checks it, so a changed label or image byte is a counted skip naming shard and key;
shard sets without ``.crc`` (older vitpipe) still read."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from tests.test_data_support import (
    copy_shards,
    flip_member_byte,
    refresh_manifest,
    rewrite_tar,
    small_fmnist,
)
from vitpipe.data import make_loader, read_manifest
from vitpipe.data.manifest import sample_crc
from vitpipe.errors import DataError

pytestmark = pytest.mark.timeout(120)
SHARD = "train-00001-00.tar"


@pytest.fixture
def shards(tmp_path_factory, tmp_path) -> str:
    return copy_shards(small_fmnist(tmp_path_factory), tmp_path / "shards")


def _eval(uri: str, **kw):
    loader = make_loader(uri, "train", 64, num_workers=2, train=False, with_keys=True, **kw)
    labels, keys = [], []
    for _, y, k in loader:
        labels.append(y)
        keys += [key for key, lab in zip(k, y.tolist(), strict=True) if lab >= 0]
    return loader, torch.cat(labels), keys


def test_good_shards_have_a_crc_per_sample_and_read_every_sample(shards):
    m = read_manifest(shards)
    assert m.sample_crc
    with tarfile.open(m.shard_urls("train")[0]) as tf:
        members: dict[str, dict[str, bytes]] = {}
        for ti in tf.getmembers():
            key, ext = ti.name.split(".", 1)
            members.setdefault(key, {})[ext] = tf.extractfile(ti).read()
    for mem in members.values():
        assert set(mem) == {"png", "cls", "crc"}
        assert mem["crc"] == b"%08x" % sample_crc(mem)
    loader, labels, keys = _eval(shards)
    assert loader.bad_samples == 0 and int((labels >= 0).sum()) == 500
    assert len(set(keys)) == 500


@pytest.mark.parametrize("ext", ["cls", "png"])
def test_changed_byte_is_a_counted_skip_naming_shard_and_key(shards, caplog, ext):
    keys = flip_member_byte(shards, SHARD, ext, at=40)
    loader, labels, seen = _eval(shards, max_bad_fraction=0.01)
    assert loader.bad_samples == 1 and loader.bad_keys == [(SHARD, keys[0])]
    assert int((labels >= 0).sum()) == 499 and keys[0] not in seen
    # training (inline, so its log is captured here): the same skip, batch counts unchanged
    with caplog.at_level(logging.WARNING, logger="vitpipe.data.loader"):
        train = make_loader(shards, "train", 16, num_workers=0, max_bad_fraction=0.01)
        assert len(list(train)) == 500 // 16 and train.bad_samples == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert any(SHARD in m and keys[0] in m and "checksum mismatch" in m for m in msgs), msgs
    # without the check the changed sample is read as if nothing happened
    off, labels, _ = _eval(shards, verify_sample_crc=False, max_bad_fraction=1.0)
    if ext == "cls":
        assert off.bad_samples == 0 and int((labels >= 0).sum()) == 500


def test_too_many_changed_labels_is_a_named_error(shards):
    flip_member_byte(shards, SHARD, "cls", n=5)
    loader = make_loader(shards, "train", 16, num_workers=2, max_bad_fraction=0.001)
    with pytest.raises(DataError, match=f"too many bad samples.*{SHARD}.*checksum mismatch"):
        list(loader)


def _strip_crc(manifest: str, name: str | None = None) -> None:
    """Make shards as an older vitpipe wrote them: no .crc members (``name``: only that one)."""
    p = Path(manifest)
    for tar in sorted(p.parent.glob("*.tar")):
        if name is None or tar.name == name:
            rewrite_tar(tar, lambda ms: [(ti, d) for ti, d in ms if not ti.name.endswith(".crc")])
    refresh_manifest(manifest)
    if name is None:
        m = json.loads(p.read_text())
        m.pop("sample_crc")
        p.write_text(json.dumps(m))


def test_old_shards_without_crc_still_read(shards, caplog):
    _strip_crc(shards)
    assert not read_manifest(shards).sample_crc
    with caplog.at_level(logging.INFO, logger="vitpipe.data.loader"):
        loader, labels, _ = _eval(shards)
    assert loader.bad_samples == 0 and int((labels >= 0).sum()) == 500
    assert sum("no per-sample .crc" in r.getMessage() for r in caplog.records) == 1


def test_missing_crc_in_a_checked_shard_set_is_a_skip(shards):
    _strip_crc(shards, SHARD)  # the manifest still says every sample has one
    loader, labels, _ = _eval(shards, max_bad_fraction=1.0)
    assert loader.bad_samples == 130 and int((labels >= 0).sum()) == 370
