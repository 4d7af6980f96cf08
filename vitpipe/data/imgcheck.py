"""Pure-Python structure checks of PNG and JPEG bytes, run before a native decoder sees them.

Why: torchvision's native decoders abort or segfault the whole process on some malformed
images (pytorch/vision #3613, #4485; PR #6456 fixed one out-of-bounds read found by fuzzing),
which no ``try/except`` can catch: one damaged sample would kill a training run. These checks
raise :class:`ImageCheckError` (a :class:`DataError`, so the loader counts a skip) instead.

* PNG: signature, IHDR first and well-formed, every chunk inside the buffer with a correct
  CRC-32 (``zlib.crc32``), IEND last; the IDAT stream is inflated by Python's zlib (safe) and
  must be complete, without trailing data, and exactly the size IHDR implies, with valid row
  filter bytes. So what reaches libpng is a stream it inflates without error.
* JPEG: SOI, a marker walk with lengths inside the buffer up to SOS, a frame header (SOF) and
  an EOI after the scan. libjpeg-turbo treats damaged entropy-coded data as a warning; the
  per-sample checksum written by ``vitpipe shard`` catches such changes in vitpipe's shards.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from ..errors import DataError


class ImageCheckError(DataError):
    """Image bytes that must not be handed to a native decoder."""


PNG_SIG = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"  # start of image, then the first marker's 0xFF
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_MAX_SIDE = 1 << 16  # 65536 px: larger images are refused (a decompression bomb guard)


def check_png(data: bytes | bytearray) -> None:
    """Raise :class:`ImageCheckError` unless ``data`` is a structurally sound PNG."""
    mv = memoryview(data)
    n = len(mv)
    if bytes(mv[:8]) != PNG_SIG:
        raise ImageCheckError("not a PNG (bad signature)")
    pos, first, idat = 8, True, []
    ihdr: tuple[int, ...] = ()
    crc32, unpack = zlib.crc32, struct.unpack_from
    while True:
        if pos + 12 > n:
            raise ImageCheckError(f"PNG truncated at byte {pos} (no IEND chunk)")
        length, = unpack(">I", mv, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            raise ImageCheckError(f"PNG chunk at byte {pos} runs past the end ({length} bytes)")
        ctype = bytes(mv[pos + 4:pos + 8])
        crc, = unpack(">I", mv, end - 4)
        if crc32(mv[pos + 4:end - 4]) != crc:
            raise ImageCheckError(f"PNG chunk {ctype!r} at byte {pos} fails its CRC-32")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise ImageCheckError("PNG does not start with a 13-byte IHDR chunk")
            ihdr = unpack(">IIBBBBB", mv, pos + 8)
            first = False
        elif ctype == b"IDAT":
            idat.append(mv[pos + 8:end - 4])
        elif ctype == b"IEND":
            break
        pos = end
    if not idat:
        raise ImageCheckError("PNG has no IDAT chunk")
    _check_png_pixels(ihdr, idat)


def _check_png_pixels(ihdr: tuple[int, ...], idat: list[memoryview]) -> None:
    width, height, depth, ctype, comp, filt, interlace = ihdr
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        raise ImageCheckError(f"PNG size {width}x{height} is outside 1..{_MAX_SIDE}")
    if (ctype not in _PNG_CHANNELS or depth not in _PNG_DEPTHS[ctype] or comp or filt
            or interlace > 1):
        raise ImageCheckError(f"PNG header is invalid (colour type {ctype}, depth {depth})")
    bpp = _PNG_CHANNELS[ctype] * depth
    if interlace:  # Adam7: seven sub-images, each with its own rows
        passes = [((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy
                  in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                      (1, 0, 2, 2), (0, 1, 1, 2))]
    else:
        passes = [(width, height)]
    rows = [(w * bpp + 7) // 8 + 1 for w, h in passes if w and h for _ in range(h)]
    expected = sum(rows)
    z = zlib.decompressobj()
    parts: list[bytes] = []
    got = 0
    try:
        for c in idat:  # bounded: never inflates more than one byte past what IHDR implies
            parts.append(z.decompress(c, expected + 1 - got))
            got += len(parts[-1])
            if got > expected or z.unconsumed_tail:
                break
    except zlib.error as err:
        raise ImageCheckError(f"PNG image data does not inflate: {err}") from None
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(raw) != expected or not z.eof or z.unused_data:
        raise ImageCheckError(f"PNG image data inflates to {len(raw)} bytes "
                              f"{'' if z.eof else '(stream incomplete) '}; IHDR implies "
                              f"{expected}")
    if not interlace:
        filters = np.frombuffer(raw, np.uint8)[::rows[0]]
    else:
        filters = np.frombuffer(raw, np.uint8)[np.cumsum([0] + rows[:-1])]
    if filters.size and int(filters.max()) > 4:
        raise ImageCheckError("PNG image data has an invalid row filter type")


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def check_jpeg(data: bytes | bytearray) -> None:
    """Raise :class:`ImageCheckError` unless ``data`` has a sound JPEG marker structure."""
    n = len(data)
    if data[:3] != JPEG_SOI:
        raise ImageCheckError("not a JPEG (no SOI marker)")
    pos, frame = 2, False
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            raise ImageCheckError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise ImageCheckError(f"JPEG has a misplaced SOI/EOI marker at byte {pos}")
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            raise ImageCheckError(f"JPEG segment 0x{marker:02X} at byte {pos} runs past the end")
        if marker in _SOF:
            if length < 8 or data[pos + 4] not in (8, 12) or not (
                    data[pos + 5] | data[pos + 6]) or not (data[pos + 7] | data[pos + 8]):
                raise ImageCheckError("JPEG frame header (SOF) is invalid")
            frame = True
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
    if not frame:
        raise ImageCheckError("JPEG has no frame header (SOF) before its scan")
    if data.rfind(b"\xff\xd9", pos) < 0:
        raise ImageCheckError("JPEG is truncated (no EOI marker after the scan)")


CHECKS = {"png": check_png, "jpg": check_jpeg, "jpeg": check_jpeg}
