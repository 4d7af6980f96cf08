"""Remote (s3://) and MLflow (runs:/) file access for checkpoints and fine-tune sources.

Thin adapter over :mod:`vitpipe.storage` so the engine code never branches on the scheme.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


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
    st = _storage()
    for full, rel in _children(uri, s3):
        st.download_file(full, str(local / rel), s3=s3)


def delete_prefix(uri: str, s3: Any = None) -> None:
    """Delete a checkpoint prefix, its ``COMPLETE`` marker first (never a "complete" half)."""
    st = _storage()
    items = _children(uri, s3)
    for full, _ in sorted(items, key=lambda x: x[1] != "COMPLETE"):
        st.delete(full, s3=s3)


def fetch_to_local(uri: str, cache_dir: Path, s3: Any = None, tracking_uri: str | None = None
                   ) -> Path:
    """A local path for ``uri``: a path/``file://`` as is, ``s3://`` or ``runs:/`` downloaded."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if uri.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow.artifacts

        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(cache_dir), tracking_uri=tracking_uri))
        except Exception as err:
            raise CheckpointError(f"cannot download {uri} from MLflow: {err}") from None
    if is_remote(uri):
        local = cache_dir / Path(uri.rstrip("/")).name
        if local.exists():
            shutil.rmtree(local) if local.is_dir() else local.unlink()
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            if exists(uri, s3):
                _storage().download_file(uri, str(local), s3=s3)
            else:
                download_prefix(uri, local, s3)
                if not local.exists():
                    raise CheckpointError(f"{uri} does not exist")
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot download {uri}: {err}") from None
        return local
    p = Path(os.path.expanduser(uri))
    if not p.exists():
        raise CheckpointError(f"{uri} does not exist")
    return p
