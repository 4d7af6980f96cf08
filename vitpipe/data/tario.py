"""Reading samples out of WebDataset tar shards, checked, with unwanted samples skipped unread.

Why not ``webdataset.tariterators``: resuming mid-epoch must skip the samples already consumed
without reading their data, and a bad shard must fail with its name and the reason (truncated,
not a tar, unsafe member path) rather than a ``ReadError`` deep in a worker (webdataset #142).
Sample boundaries follow WebDataset's rule (``base_plus_ext``: key up to the first dot).
"""

from __future__ import annotations

import os
import tarfile
from typing import IO

from webdataset.tariterators import base_plus_ext

from .. import storage
from ..config.data import S3Config
from ..errors import DataError


class ShardError(DataError):
    """A shard that cannot be read as a whole: not a tar, truncated, wrong size, unreachable."""

    def __init__(self, shard: str, reason: str):
        super().__init__(f"shard {shard}: {reason}")
        self.shard, self.reason = shard, reason


class UnsafeShardError(ShardError):
    """A tar member with an absolute or ``..`` path, or a link: never a vitpipe shard."""


def _open_size(f: IO[bytes]) -> int | None:
    raw = getattr(f, "raw", None)
    if raw is not None and hasattr(raw, "size"):
        return int(raw.size)
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return None


class TarCursor:
    """Forward-only access to a shard's samples by index (0, 1, ...)."""

    def __init__(self, url: str, s3: S3Config | None = None, expected_bytes: int | None = None):
        self.url = url
        try:
            self.file = storage.open_read(url, s3)
        except DataError as err:
            raise ShardError(url, str(err)) from None
        size = _open_size(self.file)
        if expected_bytes is not None and size is not None and size != expected_bytes:
            self.file.close()
            what = "empty" if size == 0 else f"{size} bytes"
            raise ShardError(url, f"is {what} but the manifest says {expected_bytes} bytes "
                             "(truncated or replaced); re-run `vitpipe shard --overwrite`")
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r|")  # noqa: SIM115 - kept open
        except (tarfile.TarError, EOFError, OSError) as err:
            self.file.close()
            raise ShardError(url, f"not a readable tar archive ({err})") from None
        self.index = -1  # sample index of ``key``
        self.key: str | None = None
        self.pending: tarfile.TarInfo | None = None
        self.pending_key: str | None = None
        self.pending_ext = ""
        self.done = False
        self._advance()

    def _advance(self) -> None:
        """Move to the next sample member (data unread), validating its name."""
        while True:
            try:
                ti = self.tar.next()
            except (tarfile.TarError, EOFError, OSError) as err:
                raise ShardError(self.url, f"corrupt or truncated tar ({err})") from None
            except DataError as err:
                raise ShardError(self.url, str(err)) from None
            self.tar.members = []  # stream mode keeps every header otherwise
            if ti is None:
                self.done, self.pending = True, None
                return
            name = ti.name
            if name.startswith("/") or ".." in name.split("/"):
                raise UnsafeShardError(self.url, f"member {name!r} has an absolute or '..' path; "
                                       "this is not a vitpipe/WebDataset shard")
            if ti.issym() or ti.islnk():
                raise UnsafeShardError(self.url, f"member {name!r} is a link; refusing the shard")
            if not ti.isreg() or name.rpartition("/")[2].startswith("__"):
                continue
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            self.pending, self.pending_key, self.pending_ext = ti, key, ext.lower()
            return

    def read(self, target: int) -> tuple[str, dict[str, bytes]] | None:
        """Sample ``target`` (> the last one read) as (key, {ext: bytes}); None if the shard
        ends first. Samples in between are skipped without reading their data."""
        while not self.done:
            if self.pending_key != self.key:
                self.index += 1
                self.key = self.pending_key
            if self.index < target:
                self._advance()
                continue
            if self.index > target:
                return None
            key = self.key
            members: dict[str, bytes] = {}
            while not self.done and self.pending_key == key:
                if self.pending_ext in members:
                    raise ShardError(self.url, f"sample {key!r} has two '{self.pending_ext}' "
                                     "members")
                try:
                    fobj = self.tar.extractfile(self.pending)
                    members[self.pending_ext] = fobj.read() if fobj else b""
                except (tarfile.TarError, EOFError, OSError) as err:
                    raise ShardError(self.url, f"truncated inside sample {key!r} ({err})") from None
                self._advance()
            return key, members  # type: ignore[return-value]
        return None

    def close(self) -> None:
        for closer in (getattr(self, "tar", None), getattr(self, "file", None)):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken stream
                pass
