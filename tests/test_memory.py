"""glibc malloc tuning: large blocks freed by one forward are reused by the next instead of
being mapped (and page-faulted in) afresh; off with VITPIPE_MALLOC_TUNING=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = """
import resource, sys, torch
from vitpipe.memory import reuse_freed_memory
applied = reuse_freed_memory()
for i in range(30):  # a 40 MiB activation, allocated, written and freed per 'batch'
    if i == 20:  # the steady state: glibc takes a few rounds to settle its bins
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 << 20, dtype=torch.float32).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(tuning: str) -> tuple[bool, int]:
    env = {**os.environ, "VITPIPE_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_reused_not_faulted_in_again() -> None:
    applied, tuned = _probe("1")
    off, untuned = _probe("0")
    assert applied and not off
    pages = (40 << 20) // 4096  # one 40 MiB block
    assert untuned >= 9 * pages  # mapped afresh: each of the last 10 'batches' faults in
    assert tuned <= pages // 10  # kept: the same pages serve every batch
