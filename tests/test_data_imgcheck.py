"""Damaged PNG/JPEG bytes become a DataError before the native decoder, never a dead process
(torchvision's decoders segfault on some: pytorch/vision #3613, #4485)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vitpipe.data import imgcheck

pytestmark = pytest.mark.timeout(60)


def _images() -> dict[str, list[bytes]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[bytes]] = {"png": [], "jpg": []}
    for i in range(6):
        arr = rng.integers(0, 256, (28, 28) if i % 2 else (20, 16, 3), dtype=np.uint8)
        for ext, fmt in (("png", "PNG"), ("jpg", "JPEG")):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt, **({"interlace": 1} if i == 4 and
                                                           fmt == "PNG" else {}))
            out[ext].append(buf.getvalue())
    return out


def _mutants(data: bytes, rng: np.random.Generator) -> list[bytes]:
    n = len(data)
    out = []
    for _ in range(8):
        b = bytearray(data)
        b[int(rng.integers(8, n))] ^= int(rng.integers(1, 256))  # a byte flip
        out.append(bytes(b))
    lo = int(rng.integers(8, n - 8))
    out.append(data[:lo] + bytes(min(16, n - lo)) + data[lo + 16:])  # a zeroed range
    out.append(data[:int(rng.integers(8, n))])  # truncated
    return out


def test_good_images_pass_the_checks():
    for ext, items in _images().items():
        for data in items:
            imgcheck.CHECKS[ext](data)


def test_idat_damage_with_same_size_is_refused():
    data = bytearray(_images()["png"][1])
    i = data.index(b"IDAT") + 4
    data[i:i + 4] = b"\x00\x01\x02\x03"  # what made libpng report "incorrect header check"
    with pytest.raises(imgcheck.ImageCheckError, match="CRC"):
        imgcheck.check_png(data)


_CHILD = """
import sys, pickle
from vitpipe.data import images
from vitpipe.errors import DataError
items = pickle.load(sys.stdin.buffer)
refused = 0
for ext, data in items:
    try:
        images.decode_tensor(data, ext, 1, "x")
    except DataError:
        refused += 1
print(refused, len(items))
"""


def test_fuzzed_images_never_kill_the_decoding_process():
    import pickle

    rng = np.random.default_rng(19)
    items = [(ext, m) for ext, datas in _images().items() for d in datas
             for m in _mutants(d, rng)]
    items += [("jpg", d) for d in _images()["png"]] + [("png", d) for d in _images()["jpg"]]
    r = subprocess.run([sys.executable, "-c", _CHILD], input=pickle.dumps(items),
                       capture_output=True, timeout=50)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    refused, total = map(int, r.stdout.split())
    assert total == len(items) and refused >= len(items) // 2
