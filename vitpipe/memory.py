"""Keep the memory a CPU forward frees for the next forward (glibc's allocator only).

glibc serves blocks over its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
``mmap`` calls and gives freed heap tops back to the system, so a ViT's activations (tens of
MiB per batch) can be faulted in page by page on every forward: measured in the scoring loop,
~27,000 minor page faults per batch of 256 and a forward 30% slower than the same forward run
back to back (``bench/score_speed.py``). PyTorch's CPU performance guide recommends a caching
allocator (jemalloc, tcmalloc) for this; ``mallopt`` gets the same reuse from the allocator
already loaded: no mmap for large blocks, and freed memory kept up to 1 GiB.

Set ``VITPIPE_MALLOC_TUNING=0`` to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
TRIM_THRESHOLD = 1 << 30
_done: bool | None = None


def reuse_freed_memory() -> bool:
    """Tune glibc malloc for repeated large allocations, once per process; True if applied
    (False: not glibc, or turned off by ``VITPIPE_MALLOC_TUNING=0``)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("VITPIPE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith(
            "linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    _done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc: large blocks from the heap, freed memory kept (%s)", _done)
    return _done
