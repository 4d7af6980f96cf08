"""Batch scoring: a registered model over a folder, an S3 prefix or a shard set, to Parquet.

Streaming: images are listed (keys and sizes only), decoded to tensors and preprocessed a
batch at a time with the pyfunc's own eval transform (:class:`_Batches`) in ``num_workers``
DataLoader processes, scored in batches on the model's device, and written batch by batch
with ``pyarrow.parquet.ParquetWriter``, so memory stays bounded whatever the input's size. A
row per image: ``key``, ``label``, ``top_k_labels``, ``top_k_probs``, ``probabilities``,
``model_version``, ``error``. An image that cannot be read gets a row with its ``error`` and
no prediction, never a crash. The run is an MLflow run (``score/<input name>``) with the model
URI and version, the input's digest (over keys and sizes, or the shard set's digest), the
output and rows/errors/img/s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .config import ScoreConfig
from .errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    key: str
    where: str  # a path, an s3:// URI, or a shard's URL
    size: int
    member: int = -1  # the sample's index in that shard


def list_input(cfg: ScoreConfig) -> tuple[list[Item], str]:
    """The images of ``cfg.input`` in a fixed order, and a digest naming exactly them."""
    from .data.sources import image_extensions

    src = cfg.input.rstrip("/")
    if src.endswith(".json"):
        from .data import read_manifest

        m = read_manifest(src, cfg.s3)
        items = [Item(f"{s.name}#{i}", url, 0, i)
                 for s, url in zip(m.split(cfg.split).shards, m.shard_urls(cfg.split),
                                   strict=True) for i in range(s.count)]
        return items, f"{m.digest}:{cfg.split}"
    exts = image_extensions()
    if storage.is_s3(src):
        rows = [(uri[len(src) + 1:], uri, size) for uri, size, _ in
                storage.list_objects(src, cfg.s3)]
    else:
        root = Path(src)
        if not root.is_dir():
            raise DataError(f"score input {src} is neither a folder, an s3:// prefix nor a "
                            "manifest.json")
        rows = [(str(p.relative_to(root)), str(p), p.stat().st_size)
                for p in sorted(root.rglob("*")) if p.is_file()]
    items = [Item(k, w, n) for k, w, n in rows if w.lower().endswith(exts)]
    if not items:
        raise DataError(f"no images under {src} (looked for {', '.join(exts[:6])}, ... files)")
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.size}\n".encode())
    return items, h.hexdigest()


def _format_of(data: bytes) -> str:
    """'png' or 'jpg' by the bytes' own signature (a file's name can lie), else '' (PIL)."""
    from .data.imgcheck import JPEG_SOI, PNG_SIG

    return "png" if data[:8] == PNG_SIG else "jpg" if data[:3] == JPEG_SOI else ""


class _Batches(torch.utils.data.Dataset):
    """Batch ``b`` -> (indices of its readable images, their (B, C, H, W) batch, {index: error}),
    built in a DataLoader worker.

    Images are decoded straight to uint8 tensors (libpng / libjpeg-turbo, guarded by
    :mod:`vitpipe.data.imgcheck`; other formats and any channel conversion by PIL, as the
    pyfunc does) and the pyfunc's own eval transform runs once on the stacked batch
    (:func:`vitpipe.data.transforms.transform_batch`), not image by image through PIL: the
    same numbers as ``VitClassifier.predict`` at a fraction of the cost (``bench/score_speed``).
    """

    def __init__(self, items: list[Item], batch_size: int, clf: Any, s3: Any):
        from .data.transforms import split_batchable

        self.items, self.batch_size, self.s3 = items, batch_size, s3
        self.channels, self.input_shape = clf.input_shape[0], tuple(clf.input_shape)
        self.head, self.tail = split_batchable(clf.transform)
        self._shard: tuple[str, list[bytes]] = ("", [])

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def _bytes(self, it: Item) -> bytes:
        if it.member < 0:
            return storage.read_bytes(it.where, self.s3)
        if self._shard[0] != it.where:
            from .data.tario import TarCursor

            self._shard = (it.where, _images_of(TarCursor(it.where, self.s3)))  # one at a time
        return self._shard[1][it.member]

    def _decode(self, it: Item) -> torch.Tensor:
        from .data.images import decode_tensor
        from .registry.images import ImageInputError

        data = self._bytes(it)
        try:
            return decode_tensor(data, _format_of(data), self.channels, it.key, plain=True,
                                 pil_conversion=True)
        except DataError as err:
            raise ImageInputError(str(err)) from None

    def _transform(self, imgs: list[torch.Tensor]) -> torch.Tensor:
        from .data.transforms import transform_batch
        from .registry.images import ImageInputError

        shared = torch.utils.data.get_worker_info() is not None  # no copy back to the parent
        x = transform_batch(self.head, self.tail, imgs, shared=shared)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ImageInputError(f"preprocessed to shape {tuple(x.shape[1:])}, the model "
                                  f"takes {self.input_shape}")
        return x

    def __getitem__(self, b: int) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
        good: list[int] = []
        imgs: list[torch.Tensor] = []
        errors: dict[int, str] = {}
        for i in range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.items))):
            try:
                imgs.append(self._decode(self.items[i]))
                good.append(i)
            except Exception as err:  # noqa: BLE001 - a bad image is a row with its error
                errors[i] = f"{type(err).__name__}: {err}"
        if not imgs:
            return good, None, errors
        try:
            return good, self._transform(imgs), errors
        except Exception:  # noqa: BLE001 - find the image the batch failed on, keep the rest
            kept, parts = [], []
            for i, img in zip(good, imgs, strict=True):
                try:
                    parts.append(self._transform([img]))
                    kept.append(i)
                except Exception as err:  # noqa: BLE001
                    errors[i] = f"{type(err).__name__}: {err}"
            return kept, torch.cat(parts) if parts else None, errors


def _images_of(cursor: Any) -> list[bytes]:
    """A shard's image members, in sample order (the label and checksum members left out)."""
    from .data.manifest import CRC_EXT

    out = []
    for _key, members in cursor.read_many(0, 1 << 62):
        out.append(next(v for k, v in members.items() if k not in ("cls", CRC_EXT)))
    cursor.close()
    return out


def _identity(batch: Any) -> Any:
    return batch


def decode_workers(asked: int | None, device: torch.device, batches: int) -> int:
    """``asked``, or (None) on CPU 0 up to 2 cores and 1 above, cores - 1 (at most 8) beside
    a GPU; never more than there are batches."""
    if asked is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        asked = min(8, cores - 1) if device.type == "cuda" else max(0, min(1, cores - 2))
    return max(0, min(asked, batches))


def _batches(items: list[Item], clf: Any, cfg: ScoreConfig) -> Iterator[tuple]:
    # batches are contiguous ranges of ``items``: a shard set's worker holds one shard at a time
    ds = _Batches(items, cfg.batch_size, clf, cfg.s3)
    workers = decode_workers(cfg.num_workers, clf.device, len(ds))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_identity,
                                         pin_memory=clf.device.type == "cuda")
    yield from loader


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score ``cfg.input`` with ``cfg.model`` into ``cfg.output``; returns the run's summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from .memory import reuse_freed_memory
    from .registry.predict import load_model
    from .tracking import Tracker

    reuse_freed_memory()  # else each batch's activations are page-faulted in afresh
    t0 = time.monotonic()
    items, digest = list_input(cfg)
    pyfunc = load_model(cfg.model, cfg.tracking)
    clf = pyfunc.unwrap_python_model()
    version = _version_of(cfg)
    k = min(cfg.top_k, len(clf.classes))
    schema = pa.schema([("key", pa.string()), ("label", pa.string()),
                        ("top_k_labels", pa.list_(pa.string())),
                        ("top_k_probs", pa.list_(pa.float32())),
                        ("probabilities", pa.list_(pa.float32())),
                        ("model_version", pa.string()), ("error", pa.string())])
    errors = 0
    with tempfile.TemporaryDirectory(prefix="vitpipe-score-") as tmp:
        local = Path(cfg.output) if not storage.is_s3(cfg.output) else Path(tmp) / "out.parquet"
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        bar = tqdm(total=len(items), unit="img", desc=f"score {cfg.input}",
                   disable=not cfg.progress, mininterval=1.0, dynamic_ncols=True)
        try:
            with pq.ParquetWriter(str(part), schema) as writer:
                for good, x, bad in _batches(items, clf, cfg):
                    probs = np.zeros((0, len(clf.classes)), np.float32)
                    if x is not None:
                        with torch.inference_mode():
                            logits = clf.model(x.to(clf.device, non_blocking=True))
                            probs = torch.softmax(logits.float(), -1).cpu().numpy()
                    row_of = {i: r for r, i in enumerate(good)}
                    cols: dict[str, list] = {c: [] for c in schema.names}
                    for i in sorted([*good, *bad]):
                        cols["key"].append(items[i].key)
                        cols["model_version"].append(version)
                        cols["error"].append(bad.get(i))
                        if i in bad:
                            errors += 1
                            for c in ("label", "top_k_labels", "top_k_probs", "probabilities"):
                                cols[c].append(None)
                            continue
                        p = probs[row_of[i]]
                        top = np.argsort(-p, kind="stable")[:k]
                        cols["label"].append(clf.classes[int(top[0])])
                        cols["top_k_labels"].append([clf.classes[int(j)] for j in top])
                        cols["top_k_probs"].append(p[top].tolist())
                        cols["probabilities"].append(p.tolist())
                    writer.write_table(pa.table(cols, schema=schema))
                    bar.update(len(good) + len(bad))
            part.replace(local)  # complete files only
        finally:
            bar.close()
            part.unlink(missing_ok=True)
        if storage.is_s3(cfg.output):
            storage.upload_file(local, cfg.output, cfg.s3)
    seconds = time.monotonic() - t0
    result = {"output": cfg.output, "rows": len(items), "errors": errors,
              "model_uri": cfg.model, "model_version": version, "input_digest": digest,
              "img_per_s": round(len(items) / max(seconds, 1e-9), 1),
              "seconds": round(seconds, 3)}
    tracker = Tracker(cfg.tracking)
    result["run_id"] = tracker.start(
        run_name=f"score/{Path(cfg.input.rstrip('/')).name}",
        tags={**cfg.tracking.tags, "vitpipe.mode": "score", "vitpipe.model_uri": cfg.model,
              "vitpipe.model_version": version, "vitpipe.score_input_digest": digest})
    tracker.log_params({"model": cfg.model, "input": cfg.input, "output": cfg.output,
                        "split": cfg.split, "batch_size": cfg.batch_size, "top_k": cfg.top_k})
    tracker.log_metrics({"rows": float(len(items)), "errors": float(errors),
                         "img_per_s": result["img_per_s"]}, step=0)
    tracker.end()
    log.info("scored %d images (%d errors) with %s v%s into %s at %.0f img/s", len(items),
             errors, cfg.model, version, cfg.output, result["img_per_s"])
    return result


def _version_of(cfg: ScoreConfig) -> str:
    """The registered version behind ``cfg.model`` (an alias or ``latest`` resolved); ""
    for a URI that names no registered version."""
    from .tracking import model_version, resolve_uri

    ref = cfg.model[len("models:/"):] if cfg.model.startswith("models:/") else ""
    if "/" not in ref.strip("/") and "@" not in ref:  # runs:/, a path, models:/m-<id>
        return ""
    return str(model_version(cfg.model, resolve_uri(cfg.tracking)).version)
