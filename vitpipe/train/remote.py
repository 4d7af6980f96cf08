"""Remote (s3://) and MLflow (runs:/) file access for checkpoints and fine-tune sources.

Thin adapter over :mod:`vitpipe.storage` so the engine code never branches on the scheme.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def _storage():
    from .. import storage

    return storage


def _children(uri: str, s3: Any = None) -> list[tuple[str, str]]:
    """``(full_uri, path relative to uri)`` of every object under ``uri``."""
    base = uri.rstrip("/") + "/"
    return [(u, u[len(base):]) for u in _storage().list_uris(uri, s3=s3) if u.startswith(base)]


def list_dirs(uri: str, s3: Any = None) -> list[str]:
    """Immediate child "directory" names under an s3:// prefix."""
    return sorted({rel.split("/", 1)[0] for _, rel in _children(uri, s3) if "/" in rel})


def exists(uri: str, s3: Any = None) -> bool:
    return _storage().exists(uri, s3=s3)


def upload(local: Path, uri: str, s3: Any = None) -> None:
    _storage().upload_file(str(local), uri, s3=s3)


def download_prefix(uri: str, local: Path, s3: Any = None) -> None:
    _storage().download_prefix(uri, local, s3=s3)


def delete_prefix(uri: str, s3: Any = None) -> None:
    """Delete a checkpoint prefix, its ``COMPLETE`` marker first (never a "complete" half)."""
    st = _storage()
    items = _children(uri, s3)
    for full, _ in sorted(items, key=lambda x: x[1] != "COMPLETE"):
        st.delete(full, s3=s3)
