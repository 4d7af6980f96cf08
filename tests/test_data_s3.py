"""Shards on S3 (a real SeaweedFS): shard -> manifest -> multi-worker loaders, errors."""

from __future__ import annotations

import logging
import time

import pytest
import webdataset as wds

from tests.test_data_support import fmnist_cfg
from vitpipe import storage
from vitpipe.config import S3Config
from vitpipe.data import make_loader, read_manifest, shard
from vitpipe.errors import DataError
from vitpipe.stack.process import free_port

pytestmark = pytest.mark.timeout(180)


def test_shard_to_s3_and_load_back(s3_env, caplog):
    bucket = s3_env.make_bucket("vp-shards")
    cfg = fmnist_cfg(f"{bucket}/fmnist/v1", limit=300, per_shard=70)
    uri = shard(cfg)
    assert uri == f"{bucket}/fmnist/v1/manifest.json"
    m = read_manifest(uri)
    assert {k: v.count for k, v in m.splits.items()} == {"train": 250, "val": 50, "test": 300}
    for name, url in zip([s.name for s in m.splits["test"].shards], m.shard_urls("test"),
                         strict=True):
        info = next(s for s in m.splits["test"].shards if s.name == name)
        assert storage.sha256(url) == info.sha256 and storage.size(url) == info.bytes
    with caplog.at_level(logging.INFO, logger="vitpipe.data.writer"):
        assert shard(cfg) == uri
    assert "nothing to do" in caplog.text

    runs = [make_loader(uri, "train", 16, r, 2, num_workers=2, epoch=0, verify_sha256=True)
            for r in range(2)]
    counts = [sum(1 for _ in ld) for ld in runs]
    assert counts == [250 // 32] * 2
    ev = make_loader(uri, "test", 64, num_workers=2, train=False, with_keys=True)
    keys = [k for _, _, ks in ev for k in ks if k]
    assert len(keys) == len(set(keys)) == 300

    # plain webdataset reads s3:// through vitpipe's boto3 gopen handler too
    ds = wds.WebDataset(m.shard_urls("val"), shardshuffle=False).decode("pil").to_tuple("png",
                                                                                        "cls")
    assert sum(1 for _ in ds) == 50


def test_shard_to_missing_bucket_or_dead_endpoint_fails_fast(s3_env, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DataError, match="bucket 'vp-absent' does not exist"):
        shard(fmnist_cfg("s3://vp-absent/x", limit=50))
    port = free_port()
    cfg = fmnist_cfg("s3://vp-shards/x", limit=50).model_copy(
        update={"s3": S3Config(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=1)})
    with pytest.raises(DataError, match=f"127.0.0.1:{port}.*unreachable"):
        shard(cfg)
    with pytest.raises(DataError, match=f"127.0.0.1:{port}.*unreachable"):
        make_loader("s3://vp-shards/x/manifest.json", "train", 8, s3=cfg.s3)
    assert time.monotonic() - t0 < 30
