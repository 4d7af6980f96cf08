"""``manifest.json``: what a shard set holds, written last so its presence means "complete".

Loaders plan epochs from it (per-shard counts), verify shards against it (size, SHA-256), and
normalise with its mean/std; the registry compares split digests to know two evaluations saw the
same test data.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .. import storage
from ..config.data import S3Config
from ..errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "vitpipe.shards/v1"
CRC_EXT = "crc"  # the per-sample checksum member: 8 hex digits, see sample_crc


def sample_crc(members: Mapping[str, bytes | bytearray | memoryview]) -> int:
    """CRC-32 over a sample's other members, in sorted extension order, each as
    ``ext NUL bytes``: a changed label, image byte or member name changes it. ``vitpipe shard``
    stores it as the ``.crc`` member (8 hex digits); the loader checks it on read."""
    c = 0
    for ext in sorted(members):
        if ext != CRC_EXT:
            p = _PREFIX.get(ext)
            if p is None:
                p = _PREFIX[ext] = ext.encode() + b"\0"
            c = zlib.crc32(members[ext], zlib.crc32(p, c))
    return c


_PREFIX: dict[str, bytes] = {}  # ext -> b"ext\0" (on small images the encode shows)


class ManifestNotFound(DataError):
    """No manifest where one was expected: never sharded, or an interrupted run."""


class ShardInfo(BaseModel):
    """One tar: its file name beside the manifest, sample count, byte size and SHA-256."""

    name: str
    count: int
    bytes: int
    sha256: str


class SplitInfo(BaseModel):
    """A split: its shards in order, totals, class histogram, pixel statistics and digest."""

    count: int
    shards: list[ShardInfo]
    digest: str
    class_counts: list[int]
    mean: list[float]
    std: list[float]


class SourceInfo(BaseModel):
    """Where the images came from, and a digest that changes when the source does."""

    kind: str
    path: str
    digest: str
    test_path: str | None = None
    val_path: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)  # source split sizes (before limits)


class Manifest(BaseModel):
    """The shard set. Construct with :func:`read_manifest` to get working ``shard_urls``."""

    model_config = ConfigDict(extra="ignore")

    format: str = FORMAT
    source: SourceInfo
    config: dict[str, Any]
    config_digest: str
    classes: list[str]
    channels: int
    image_size: tuple[int, int] | None  # (H, W) when every image has it, else None
    image_format: str
    mean: list[float]  # of the train split, per channel, pixels scaled to [0, 1]
    std: list[float]
    splits: dict[str, SplitInfo]
    digest: str
    created_at: str
    vitpipe_version: str = ""
    sample_crc: bool = False  # every sample has a .crc member (older shard sets: none)
    version: int = 1  # 1 for a first sharding; +1 each time the source changed
    parent: str | None = None  # digest of the version this one replaced (manifest-<digest>.json)
    index: str | None = None  # the source index beside it (vitpipe.data.versions), if any
    _base: str = PrivateAttr(default="")

    @property
    def uri(self) -> str:
        return storage.join(self._base, MANIFEST_NAME) if self._base else ""

    @property
    def base(self) -> str:
        """The directory/prefix holding the manifest and its shards."""
        return self._base

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mode(self) -> str:
        """The PIL mode images are read as: ``L`` (1 channel) or ``RGB``."""
        return "L" if self.channels == 1 else "RGB"

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split '{name}' is not in {self.uri or 'the manifest'}; it has: "
                            f"{', '.join(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Full URIs of a split's shards, in manifest order."""
        return [storage.join(self._base, s.name) for s in self.split(split).shards]

    def with_base(self, base: str) -> Manifest:
        self._base = base.rstrip("/") if "://" in base else base
        return self


def split_digest(shards: list[ShardInfo]) -> str:
    """Hash of the split's shard hashes, in order."""
    return hashlib.sha256("\n".join(s.sha256 for s in shards).encode()).hexdigest()


def dataset_digest(splits: dict[str, SplitInfo]) -> str:
    """Hash of every shard hash (split by split, sorted by split name)."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(f"{name}\n".encode())
        for s in splits[name].shards:
            h.update(f"{s.sha256}\n".encode())
    return h.hexdigest()


def manifest_uri(uri_or_dir: str) -> str:
    """Accept either the manifest's URI or the directory/prefix holding it."""
    s = str(uri_or_dir)
    return s if s.rstrip("/").endswith(".json") else storage.join(s, MANIFEST_NAME)


def read_manifest(uri: str, s3: S3Config | None = None) -> Manifest:
    """Read and validate a manifest (local path, file:// or s3://; a directory works too)."""
    uri = manifest_uri(uri)
    try:
        text = storage.read_text(uri, s3)
    except storage.StorageNotFound:
        raise ManifestNotFound(f"no manifest at {uri}: the shards there are missing or incomplete "
                        "(an interrupted run); run `vitpipe shard` for this output") from None
    try:
        m = Manifest.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as err:
        raise DataError(f"{uri} is not a valid vitpipe manifest: {str(err).splitlines()[0]}; "
                        "re-run `vitpipe shard --overwrite`") from None
    if m.format != FORMAT:
        raise DataError(f"{uri} has format {m.format!r}; this vitpipe reads {FORMAT!r}")
    return m.with_base(storage.parent(uri))


def write_manifest(m: Manifest, base: str, s3: S3Config | None = None) -> str:
    """Atomically write ``manifest.json`` under ``base``; returns its URI."""
    uri = storage.join(base, MANIFEST_NAME)
    storage.write_text(uri, m.model_dump_json(indent=1), s3)
    m.with_base(base)
    return uri
