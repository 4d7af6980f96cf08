"""Decode, check, convert and encode single images (PIL), with errors that name the image."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from ..errors import DataError
from . import imgcheck

# Modes that convert cleanly to 8-bit L or RGB; anything else (I, F, I;16, HSV...) is refused.
GRAY_MODES = {"1", "L", "LA", "La"}
COLOR_MODES = {"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


def decode(data: bytes, origin: str) -> Image.Image:
    """Fully decode ``data`` (so truncation shows now, not later) or raise naming ``origin``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"corrupt or unreadable image {origin}: {err}") from None
    return img


TENSOR_DECODABLE = frozenset(("png", "jpg", "jpeg"))  # checked first (imgcheck); others: PIL


def _image_op() -> Callable | None:
    """torchvision's decoder op itself: the public ``torchvision.io.decode_image`` adds a
    deprecation warning and API-usage logging per call (~15 us, a third of a 28x28 PNG's
    decode), as torchvision 0.29 moves decoding to TorchCodec."""
    global _DECODE_OP
    if _DECODE_OP is None:
        import torchvision.io  # noqa: F401 - registers torch.ops.image

        try:
            _DECODE_OP = torch.ops.image.decode_image
        except (AttributeError, RuntimeError):  # a torchvision without the op: the public API
            from torchvision.io import decode_image

            _DECODE_OP = lambda data, mode, exif: decode_image(data, mode=mode)  # noqa: E731
    return _DECODE_OP


_DECODE_OP: Callable | None = None


_UNCHANGED, _GRAY, _RGB = 0, 1, 3  # torchvision.io.ImageReadMode values, as the op takes them


def _png_channels(data: bytes | bytearray) -> int:
    """1 or 3 for an 8-bit grey or RGB PNG (IHDR bit depth and colour type), else 0: in
    UNCHANGED mode the native decoder returns a palette PNG's indices as grey levels."""
    if len(data) < 26 or data[12:16] != b"IHDR" or data[24] != 8:
        return 0
    return {0: 1, 2: 3}.get(data[25], 0)


def decode_tensor(data: bytes | bytearray, ext: str, channels: int, origin: str, *,
                  plain: bool = False, pil_conversion: bool = False) -> torch.Tensor:
    """Decode to a uint8 ``tv_tensors.Image`` (C, H, W) with ``channels`` channels, in
    channels-last memory for colour images; ``plain``: a plain tensor (for batch-only
    transforms, which need no tv_tensor dispatch: saves ~2 us per image). ``pil_conversion``:
    only images that already have ``channels`` channels take the native decoder; others are
    converted by PIL, as the sharder and the registered pyfunc convert them (libpng's RGB ->
    gray weights are Rec. 709, PIL's Rec. 601, so the two would disagree by a grey level).

    torchvision's decoders (libpng/libjpeg-turbo straight into a tensor) are 2-2.5x faster than
    PIL + conversion; other formats, and anything they reject, go through PIL, which also gives
    the definitive "corrupt image" error. PNG and JPEG bytes are checked first
    (:mod:`vitpipe.data.imgcheck`): a malformed image must not reach a native decoder.
    """
    if ext in TENSOR_DECODABLE:
        check = imgcheck.CHECKS.get(ext)
        if check is not None:
            try:  # the native decoders can crash the process on malformed bytes
                check(data)
            except imgcheck.ImageCheckError as err:
                raise DataError(f"corrupt image {origin}: {err}") from None
        # pil_conversion: a PNG qualifies by its header; a JPEG is decoded as it is and kept
        # if its channel count matches
        native = not pil_conversion or ext != "png" or _png_channels(data) == channels
        mode = _GRAY if channels == 1 else _RGB
        if pil_conversion and ext != "png":
            mode = _UNCHANGED
        try:
            # torch.frombuffer needs a writable buffer: a bytearray (as the shard reader hands
            # out) is used as it is, bytes are copied
            buf = data if type(data) is bytearray else bytearray(data)
            t = _image_op()(torch.frombuffer(buf, dtype=torch.uint8), mode, False) if native \
                else None
            if t is not None and t.dtype is torch.uint8 and t.ndim == 3 and (
                    t.shape[0] == channels):  # else (16-bit, CMYK, ...): PIL below
                # a (C, H, W) view of (H, W, C) memory: kept so, as batches are stacked
                # channels-last (transforms.transform_batch), where resizing is 2-3x faster
                return t if plain else t.as_subclass(tv_tensors.Image)
        except RuntimeError:
            pass
    img = to_mode(decode(data, origin), "L" if channels == 1 else "RGB", origin)
    t = torch.from_numpy(np.array(img))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t if plain else t.as_subclass(tv_tensors.Image)


def channels_of(img: Image.Image, origin: str) -> int:
    """1 for grayscale modes, 3 for colour modes; unsupported modes raise naming the image."""
    if img.mode in GRAY_MODES:
        return 1
    if img.mode in COLOR_MODES:
        return 3
    raise DataError(f"image {origin} has unsupported mode {img.mode!r}; vitpipe reads 8-bit "
                    "grayscale or colour images (L, RGB, P, RGBA, CMYK...); convert it first")


def to_mode(img: Image.Image, mode: str, origin: str) -> Image.Image:
    """Convert to ``L`` or ``RGB`` (checking the source mode is supported)."""
    channels_of(img, origin)
    return img if img.mode == mode else img.convert(mode)


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """PNG (lossless) or JPEG at ``quality``."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ext_of(img: Image.Image) -> str:
    """The shard member extension for an image's own encoding."""
    fmt = (img.format or "PNG").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


class PixelStats:
    """Running per-channel sum and sum of squares of pixels scaled to [0, 1]."""

    def __init__(self, channels: int):
        self.n = 0
        self.s = np.zeros(channels, np.float64)
        self.ss = np.zeros(channels, np.float64)

    def add(self, img: Image.Image) -> None:
        a = np.asarray(img, dtype=np.float64).reshape(-1, len(self.s)) / 255.0
        self.n += a.shape[0]
        self.s += a.sum(0)
        self.ss += np.einsum("ij,ij->j", a, a)

    def merge(self, other: PixelStats) -> None:
        self.n += other.n
        self.s += other.s
        self.ss += other.ss

    def mean_std(self) -> tuple[list[float], list[float]]:
        if self.n == 0:
            return [0.0] * len(self.s), [1.0] * len(self.s)
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.ss / self.n - mean**2, 0.0))
        return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-6)), 6) for s in std]
