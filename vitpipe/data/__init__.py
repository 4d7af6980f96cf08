"""Data stage: sources -> WebDataset shards + ``manifest.json``; manifest -> per-rank loaders.

``shard(cfg) -> manifest URI``, ``read_manifest(uri)``, ``make_loader(...)`` and the transforms in
:mod:`vitpipe.data.transforms`. The loader and transforms import torch lazily (on first use).
"""

from __future__ import annotations

from typing import Any

from .manifest import Manifest, ManifestNotFound, ShardInfo, SplitInfo, read_manifest
from .writer import shard

__all__ = [
    "Manifest",
    "ManifestNotFound",
    "ShardInfo",
    "SplitInfo",
    "make_loader",
    "read_manifest",
    "shard",
    "steps_per_epoch",
]


def make_loader(*args: Any, **kwargs: Any):
    """See :func:`vitpipe.data.loader.make_loader`."""
    from .loader import make_loader as _make_loader

    return _make_loader(*args, **kwargs)


def steps_per_epoch(*args: Any, **kwargs: Any) -> int:
    """See :func:`vitpipe.data.loader.steps_per_epoch`."""
    from .loader import steps_per_epoch as _steps

    return _steps(*args, **kwargs)
