"""Local/``file://`` and ``s3://`` reads and atomic writes, shared by every stage.

Why atomic: a reader must never take a half-written shard, manifest or checkpoint for complete.
Locally a write goes to a hidden temp file in the same directory and is renamed into place; on
S3 the object is uploaded from a local temp file and only exists once the upload completes; its
MD5 is checked by the server (``Content-MD5``) and against the returned ETag.

S3 settings come from the standard AWS environment/profile (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...), with :class:`S3Config` able to override the endpoint and
region. Transient failures are retried within ``max_retry_seconds``; a refused connection or a
missing bucket fails at once with the endpoint and bucket named. Credentials are never printed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlparse

from .config.data import S3Config
from .errors import DataError

T = TypeVar("T")
_MULTIPART_THRESHOLD = 1 << 30  # single PUT (server-verified Content-MD5) up to 1 GiB
_PART_SIZE = 64 << 20


class StorageNotFound(DataError, FileNotFoundError):
    """The file or object does not exist (the bucket does)."""


# ----------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DataError(f"not an s3:// URI: {uri!r} (expected s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str | os.PathLike) -> Path:
    """The filesystem path of a plain path or ``file://`` URI."""
    s = str(uri)
    if s.startswith("file://"):
        return Path(unquote(urlparse(s).path))
    if "://" in s:
        raise DataError(f"unsupported URI scheme in {s!r}: use a local path, file:// or s3://")
    return Path(s)


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URI, keeping its scheme."""
    s = str(base)
    if is_s3(s) or s.startswith("file://"):
        return "/".join([s.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(s).joinpath(*parts))


def parent(uri: str) -> str:
    """The directory/prefix holding ``uri``."""
    s = str(uri)
    if is_s3(s) or s.startswith("file://"):
        return s.rstrip("/").rsplit("/", 1)[0]
    return str(Path(s).parent)


# ----------------------------------------------------------------------------- S3 client

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def endpoint_of(s3: S3Config | None = None) -> str | None:
    """The S3 endpoint in effect: config, then ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``."""
    return ((s3.endpoint_url if s3 else None) or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def client(s3: S3Config | None = None):
    """A boto3 S3 client, one per process and settings (boto3 clients are not fork-safe)."""
    s3 = s3 or S3Config()
    endpoint = endpoint_of(s3)
    region = s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    key = (os.getpid(), endpoint, region, s3.connect_timeout)
    with _clients_lock:
        if key in _clients:
            return _clients[key]
        import boto3
        from botocore.config import Config

        cfg = Config(
            connect_timeout=s3.connect_timeout, read_timeout=max(30.0, s3.connect_timeout),
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        c = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region or
                                           "us-east-1", config=cfg)
        _clients[key] = c
        return c


def _describe_endpoint(s3: S3Config | None) -> str:
    return endpoint_of(s3) or "the default AWS endpoint"


def _translate(err: Exception, uri: str, s3: S3Config | None, action: str) -> Exception:
    """A boto/botocore error as a :class:`DataError` naming endpoint and bucket, no secrets."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    bucket, key = split_s3(uri)
    where = f"s3://{bucket}/{key} at {_describe_endpoint(s3)}"
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return DataError(f"cannot {action} {where}: no AWS credentials found; set "
                         "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(err, EndpointConnectionError):
        return DataError(f"cannot {action} {where}: S3 endpoint unreachable "
                         f"({_describe_endpoint(s3)}); check AWS_ENDPOINT_URL / s3.endpoint_url "
                         "and that the server is running")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket" or (not key and code in ("404", "NotFound", "NoSuchKey")):
            return DataError(f"cannot {action} {where}: bucket '{bucket}' does not exist; "
                             "create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageNotFound(f"cannot {action} {where}: no such object")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return DataError(f"cannot {action} {where}: access denied ({code}); check the "
                             "AWS credentials in the environment/profile")
        return DataError(f"cannot {action} {where}: S3 error {code or 'unknown'}")
    return DataError(f"cannot {action} {where}: {type(err).__name__}: {err}")


def _retryable(err: Exception) -> bool:
    """Transient (retry within the time budget) vs. permanent (fail now)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(err, EndpointConnectionError):
        return False  # botocore already retried the connect; an unreachable endpoint is fatal
    if isinstance(err, (ReadTimeoutError, ConnectionClosedError, ResponseStreamingError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = str(err.response.get("Error", {}).get("Code", ""))
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return False


def _call(fn: Callable[[], T], uri: str, s3: S3Config | None, action: str) -> T:
    """Run an S3 call, retrying transient errors until ``max_retry_seconds`` have passed."""
    budget = (s3 or S3Config()).max_retry_seconds
    deadline = time.monotonic() + budget
    delay = 0.2
    while True:
        try:
            return fn()
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - translated below
            if not _retryable(err) or time.monotonic() + delay > deadline:
                raise _translate(err, uri, s3, action) from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)


# ----------------------------------------------------------------------------- reading


class _S3Stream(io.RawIOBase):
    """A streaming S3 object read that resumes from its byte offset after a dropped connection."""

    def __init__(self, uri: str, s3: S3Config | None):
        self.uri, self.s3 = uri, s3
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.body = None
        self.size = self._open()

    def _open(self) -> int:
        c = client(self.s3)
        kw = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        resp = _call(lambda: c.get_object(Bucket=self.bucket, Key=self.key, **kw),
                     self.uri, self.s3, "read")
        self.body = resp["Body"]
        return int(resp["ContentLength"]) + self.pos

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        deadline = time.monotonic() + (self.s3 or S3Config()).max_retry_seconds
        while True:
            try:
                data = self.body.read(len(b))
                if not data and self.pos < self.size:
                    raise ConnectionError("stream ended early")
                break
            except Exception as err:  # noqa: BLE001 - any broken stream: reopen at pos
                if time.monotonic() > deadline:
                    raise DataError(f"reading {self.uri} failed at byte {self.pos} of "
                                    f"{self.size}: {type(err).__name__}") from None
                with contextlib.suppress(Exception):
                    self.body.close()
                time.sleep(0.2)
                self._open()
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
        super().close()


def open_read(uri: str | os.PathLike, s3: S3Config | None = None,
              buffer_size: int = 1 << 20) -> IO[bytes]:
    """Open for streaming binary reads. S3 streams resume after dropped connections."""
    uri = str(uri)
    if is_s3(uri):
        return io.BufferedReader(_S3Stream(uri, s3), buffer_size=buffer_size)
    p = local_path(uri)
    try:
        return open(p, "rb", buffering=buffer_size)  # noqa: SIM115 - returned to the caller
    except FileNotFoundError:
        raise StorageNotFound(f"no such file: {p}") from None
    except OSError as err:
        raise DataError(f"cannot read {p}: {err.strerror}") from None


def read_bytes(uri: str | os.PathLike, s3: S3Config | None = None) -> bytes:
    with open_read(uri, s3) as f:
        return f.read()


def read_text(uri: str | os.PathLike, s3: S3Config | None = None) -> str:
    return read_bytes(uri, s3).decode("utf-8")


def size(uri: str | os.PathLike, s3: S3Config | None = None) -> int:
    """Byte size of a file or object."""
    uri = str(uri)
    if is_s3(uri):
        b, k = split_s3(uri)
        c = client(s3)
        return int(_call(lambda: c.head_object(Bucket=b, Key=k), uri, s3, "stat")["ContentLength"])
    try:
        return local_path(uri).stat().st_size
    except FileNotFoundError:
        raise StorageNotFound(f"no such file: {local_path(uri)}") from None


def exists(uri: str | os.PathLike, s3: S3Config | None = None) -> bool:
    try:
        size(uri, s3)
        return True
    except StorageNotFound:
        return False


def sha256(uri: str | os.PathLike, s3: S3Config | None = None) -> str:
    """Hex SHA-256 of a file or object, streamed."""
    h = hashlib.sha256()
    with open_read(uri, s3) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def list_objects(prefix: str, s3: S3Config | None = None) -> list[tuple[str, int, str]]:
    """``(URI, size, ETag)`` of every object under an ``s3://`` prefix (recursive), sorted."""
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    c = client(s3)

    def pages() -> list[tuple[str, int, str]]:
        out = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [(f"s3://{bucket}/{o['Key']}", int(o["Size"]), str(o.get("ETag", "")))
                    for o in page.get("Contents", [])]
        return out

    return sorted(_call(pages, prefix, s3, "list"))


def list_uris(prefix: str | os.PathLike, s3: S3Config | None = None) -> list[str]:
    """Every file/object under ``prefix`` (recursive), sorted, as full URIs/paths."""
    prefix = str(prefix)
    if is_s3(prefix):
        return [uri for uri, _, _ in list_objects(prefix, s3)]
    root = local_path(prefix)
    if not root.exists():
        return []
    scheme = "file://" if prefix.startswith("file://") else ""
    return sorted(f"{scheme}{p}" for p in root.rglob("*") if p.is_file())


def delete(uri: str | os.PathLike, s3: S3Config | None = None) -> None:
    """Delete one file/object; a missing one is fine."""
    uri = str(uri)
    if is_s3(uri):
        b, k = split_s3(uri)
        c = client(s3)
        _call(lambda: c.delete_object(Bucket=b, Key=k), uri, s3, "delete")
        return
    with contextlib.suppress(FileNotFoundError):
        local_path(uri).unlink()


def check_bucket(uri: str, s3: S3Config | None = None) -> None:
    """Fail fast (endpoint + bucket named) when the bucket is missing or unreachable."""
    if not is_s3(uri):
        return
    b, _ = split_s3(uri)
    c = client(s3)
    _call(lambda: c.head_bucket(Bucket=b), f"s3://{b}/", s3, "access bucket")


# ----------------------------------------------------------------------------- writing


class HashingFile(io.RawIOBase):
    """A write-only file that forwards to ``raw`` and keeps SHA-256, MD5 and a byte count."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self._sha, self._md5 = hashlib.sha256(), hashlib.md5()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = self.raw.write(b)
        mv = memoryview(b)[:n] if n is not None else memoryview(b)
        self._sha.update(mv)
        self._md5.update(mv)
        self.nbytes += len(mv)
        return len(mv)

    def flush(self) -> None:
        self.raw.flush()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")


@contextlib.contextmanager
def atomic_write(uri: str | os.PathLike, s3: S3Config | None = None) -> Iterator[HashingFile]:
    """Write a file/object so that it appears complete or not at all.

    Yields a :class:`HashingFile`; after the block its ``sha256``/``nbytes`` describe what was
    written. On an exception nothing is published and the temp file is removed.
    """
    uri = str(uri)
    if is_s3(uri):
        check_bucket(uri, s3)
        fd, tmp_name = tempfile.mkstemp(prefix="vitpipe-upload-")
        tmp = Path(tmp_name)
    else:
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(fd, "wb", buffering=1 << 20) as raw:
            hf = HashingFile(raw)
            yield hf
            raw.flush()
        if is_s3(uri):
            _upload(tmp, uri, s3, md5=hf.md5, nbytes=hf.nbytes)
        else:
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(uri: str | os.PathLike, data: bytes, s3: S3Config | None = None) -> str:
    """Atomically write ``data``; returns its SHA-256."""
    with atomic_write(uri, s3) as f:
        f.write(data)
    return f.sha256


def write_text(uri: str | os.PathLike, text: str, s3: S3Config | None = None) -> str:
    return write_bytes(uri, text.encode("utf-8"), s3)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _multipart_etag(path: Path, part_size: int) -> str:
    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def _upload(path: Path, uri: str, s3: S3Config | None, md5: str | None = None,
            nbytes: int | None = None) -> None:
    """Upload a local file; the object appears only when complete; its checksum is verified."""
    bucket, key = split_s3(uri)
    c = client(s3)
    nbytes = path.stat().st_size if nbytes is None else nbytes
    if nbytes <= _MULTIPART_THRESHOLD:
        md5 = md5 or _file_md5(path)
        content_md5 = base64.b64encode(bytes.fromhex(md5)).decode()

        def put() -> dict:
            with open(path, "rb") as f:
                return c.put_object(Bucket=bucket, Key=key, Body=f, ContentMD5=content_md5,
                                    ContentLength=nbytes)

        etag = _call(put, uri, s3, "upload").get("ETag", "").strip('"')
        expected = md5
    else:
        from boto3.s3.transfer import TransferConfig

        tc = TransferConfig(multipart_threshold=_PART_SIZE, multipart_chunksize=_PART_SIZE)
        _call(lambda: c.upload_file(str(path), bucket, key, Config=tc), uri, s3, "upload")
        etag = _call(lambda: c.head_object(Bucket=bucket, Key=key), uri, s3,
                     "verify")["ETag"].strip('"')
        expected = _multipart_etag(path, _PART_SIZE)
    if etag and etag != expected:
        with contextlib.suppress(Exception):
            c.delete_object(Bucket=bucket, Key=key)
        raise DataError(f"upload of {uri} at {_describe_endpoint(s3)} failed verification: "
                        f"ETag {etag} != local checksum {expected}; the object was removed, "
                        "retry the run")


def upload_file(path: str | os.PathLike, uri: str, s3: S3Config | None = None) -> None:
    """Copy a local file to ``uri`` (local or S3) atomically."""
    path = Path(path)
    if is_s3(uri):
        check_bucket(uri, s3)
        _upload(path, uri, s3)
        return
    with atomic_write(uri) as f, open(path, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)


def download_file(uri: str, path: str | os.PathLike, s3: S3Config | None = None) -> Path:
    """Copy ``uri`` to a local path atomically; returns the path."""
    path = Path(path)
    with open_read(uri, s3) as src, atomic_write(path) as f:
        shutil.copyfileobj(src, f, 1 << 20)
    return path


def download_prefix(prefix: str, path: str | os.PathLike, s3: S3Config | None = None
                    ) -> list[Path]:
    """Copy every file/object under ``prefix`` into the local directory ``path``, keeping
    their relative paths; returns the local files."""
    base = str(prefix).rstrip("/") + "/"
    return [download_file(u, Path(path) / u[len(base):], s3=s3)
            for u in list_uris(prefix, s3=s3) if u.startswith(base)]
