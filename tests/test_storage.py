"""vitpipe.storage against the local filesystem and a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from vitpipe import storage
from vitpipe.config import S3Config
from vitpipe.errors import DataError
from vitpipe.stack.process import free_port

pytestmark = pytest.mark.timeout(120)


def test_local_atomic_write_read_list_delete(tmp_path):
    uri = f"file://{tmp_path}/a/b.bin"
    with storage.atomic_write(uri) as f:
        f.write(b"x" * 1000)
        assert not (tmp_path / "a" / "b.bin").exists()  # not visible until complete
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    assert f.nbytes == 1000 and f.sha256 == digest
    assert storage.read_bytes(uri) == b"x" * 1000 and storage.size(uri) == 1000
    with pytest.raises(RuntimeError), storage.atomic_write(tmp_path / "a" / "c.bin") as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin"]  # no partial file, no temp
    assert storage.list_uris(f"file://{tmp_path}") == [uri]
    assert storage.sha256(uri) == digest
    storage.delete(uri)
    storage.delete(uri)  # missing is fine
    assert not storage.exists(uri)
    with pytest.raises(storage.StorageNotFound, match="no such file"):
        storage.read_bytes(uri)


def test_s3_round_trip(s3_env):
    bucket = s3_env.make_bucket("vp-storage")
    data = os.urandom(3 * 2**20 + 17)
    uri = f"{bucket}/dir/obj.bin"
    assert storage.write_bytes(uri, data) == hashlib.sha256(data).hexdigest()
    assert storage.exists(uri) and storage.size(uri) == len(data)
    assert storage.read_bytes(uri) == data
    assert storage.sha256(uri) == hashlib.sha256(data).hexdigest()
    storage.write_text(f"{bucket}/dir/sub/t.txt", "hello")
    assert storage.list_uris(f"{bucket}/dir") == [uri, f"{bucket}/dir/sub/t.txt"]
    with pytest.raises(RuntimeError), storage.atomic_write(f"{bucket}/dir/partial") as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert not storage.exists(f"{bucket}/dir/partial")  # never uploaded
    local = storage.download_file(uri, s3_env.data_dir / "copy.bin")
    assert local.read_bytes() == data
    storage.upload_file(local, f"{bucket}/dir/up.bin")
    assert storage.read_bytes(f"{bucket}/dir/up.bin") == data
    for u in storage.list_uris(f"{bucket}/dir"):
        storage.delete(u)
    assert storage.list_uris(f"{bucket}/dir") == []


def test_s3_stream_resumes_after_a_dropped_connection(s3_env):
    bucket = s3_env.make_bucket("vp-stream")
    data = os.urandom(4 * 2**20)
    storage.write_bytes(f"{bucket}/big", data)
    with storage.open_read(f"{bucket}/big", buffer_size=64 * 1024) as f:
        head = f.read(2**20)
        f.raw.body.close()  # the connection drops mid-object
        rest = f.read()
    assert head + rest == data


def test_unreachable_endpoint_fails_fast_naming_it(s3_env):
    port = free_port()
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(DataError, match=f"127.0.0.1:{port}.*unreachable") as err:
        storage.read_bytes("s3://somebucket/key", cfg)
    assert time.monotonic() - t0 < 10
    assert s3_env.secret_key not in str(err.value)


def test_missing_bucket_and_bad_credentials_are_named(s3_env, monkeypatch):
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/k")
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        storage.write_bytes("s3://no-such-bucket/k", b"x")
    bucket = s3_env.make_bucket("vp-creds")
    storage.write_bytes(f"{bucket}/k", b"x")
    with pytest.raises(storage.StorageNotFound, match="no such object"):
        storage.read_bytes(f"{bucket}/missing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    storage._clients.clear()
    try:
        with pytest.raises(DataError, match="access denied") as err:
            storage.read_bytes(f"{bucket}/k")
        assert "wrong-secret-value-123" not in str(err.value)
        assert s3_env.access_key not in str(err.value)
    finally:
        storage._clients.clear()
