"""Turn one raw input row into a PIL image in the model's mode, or say exactly why not.

MLflow serving does not decode images for us (mlflow #11170), so the pyfunc accepts every form a
caller is likely to have: encoded bytes (PNG/JPEG/...), base64 text (optionally a ``data:`` URL),
a file path, a numpy array (H, W), (H, W, C) or (C, H, W), or a PIL image. Each failure is an
:class:`ImageInputError` whose message names the problem; the pyfunc turns it into a per-row
error instead of failing the whole batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

_MODES = {1: "L", 3: "RGB"}
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_MAX_PATH = 4096


class ImageInputError(DataError):
    """One input row that is not a usable image (undecodable, wrong channels, empty)."""


def mode_for_channels(channels: int) -> str:
    """The PIL mode a model with ``channels`` input channels consumes."""
    try:
        return _MODES[channels]
    except KeyError:
        raise ImageInputError(f"models with {channels} input channels are not supported "
                              "(1 = grayscale, 3 = RGB)") from None


def load_image(value: Any, mode: str) -> Image.Image:
    """Decode ``value`` and convert it to ``mode`` ('L' or 'RGB'); raise ImageInputError.

    Conversion accepts the same source modes as the sharder (``vitpipe.data.images``), so a
    16-bit or float image is refused instead of being silently clipped to 8 bits.
    """
    from ..data.images import to_mode

    img = _decode(value)
    try:
        return to_mode(img, mode, f"({img.format or 'array'} {img.width}x{img.height})")
    except DataError as err:
        raise ImageInputError(str(err)) from None


def _decode(value: Any) -> Image.Image:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ImageInputError("empty value (None/NaN) where an image was expected")
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(value), "bytes")
    if isinstance(value, Path):
        return _open_path(value)
    if isinstance(value, str):
        return _decode_str(value)
    if isinstance(value, np.ndarray):
        return _from_array(value)
    if hasattr(value, "numpy") and hasattr(value, "shape"):  # a torch tensor
        return _from_array(value.detach().cpu().numpy())
    raise ImageInputError(f"unsupported input type {type(value).__name__}; pass encoded "
                          "bytes, base64 text, a file path or a numpy array")


def _decode_str(text: str) -> Image.Image:
    text = text.strip()
    if not text:
        raise ImageInputError("empty string where an image was expected")
    if len(text) < _MAX_PATH and os.path.isfile(text):
        return _open_path(Path(text))
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        looks_like_path = len(text) < 512 and ("/" in text or "." in text[-6:])
        if looks_like_path:
            raise ImageInputError(f"no such image file: {text!r}") from None
        raise ImageInputError("text is neither an existing file path nor valid base64 "
                              f"(starts with {text[:24]!r})") from None
    return _open_bytes(raw, "base64 data")


def _open_path(path: Path) -> Image.Image:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ImageInputError(f"cannot read image file {str(path)!r}: {err.strerror}") from None
    return _open_bytes(raw, f"file {str(path)!r}")


def _open_bytes(raw: bytes, what: str) -> Image.Image:
    if not raw:
        raise ImageInputError(f"{what} is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # Image.open is lazy: force the decode so truncation fails here
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as err:
        head = raw[:8].hex()
        raise ImageInputError(f"{what} ({len(raw)} bytes, starts 0x{head}) does not decode "
                              f"as an image: {err}") from None
    return img


def _from_array(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in 1/3/4 -> PIL; uint8, or floats in [0, 1]."""
    shape = tuple(arr.shape)
    if arr.ndim == 3 and arr.shape[-1] not in _ARRAY_MODES and arr.shape[0] in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise ImageInputError(f"image array of shape {shape}: expected (H, W), (H, W, C) "
                              "or (C, H, W)")
    if arr.ndim == 3 and arr.shape[-1] not in _ARRAY_MODES:
        raise ImageInputError(f"image array of shape {shape} has {arr.shape[-1]} channels; "
                              "expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")
    arr = _to_uint8(arr, shape)
    mode = "L" if arr.ndim == 2 else _ARRAY_MODES[arr.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _to_uint8(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageInputError(f"image array of shape {shape} holds NaN/inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise ImageInputError(f"float image array of shape {shape} has values in "
                                  f"[{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageInputError(f"integer image array of shape {shape} has values in "
                                  f"[{lo}, {hi}]; expected 0..255")
        return arr.astype(np.uint8)
    raise ImageInputError(f"image array of dtype {arr.dtype} is not numeric")
