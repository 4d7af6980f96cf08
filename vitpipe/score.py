"""Batch scoring: a registered model over a folder, an S3 prefix or a shard set, to Parquet.

Streaming: images are listed (keys and sizes only), decoded and preprocessed by the pyfunc's
own code (``VitClassifier._preprocess``: the evaluator's transform) in ``num_workers``
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


class _Images(torch.utils.data.Dataset):
    """Item -> (index, preprocessed tensor or None, error or None), in a worker process."""

    def __init__(self, items: list[Item], clf: Any, s3: Any):
        self.items, self.clf, self.s3 = items, clf, s3
        self._shards: dict[str, list[bytes]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _bytes(self, it: Item) -> bytes:
        if it.member < 0:
            return storage.read_bytes(it.where, self.s3)
        if it.where not in self._shards:
            from .data.tario import TarCursor

            self._shards = {it.where: _images_of(TarCursor(it.where, self.s3))}  # one at a time
        return self._shards[it.where][it.member]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.clf._preprocess(self._bytes(self.items[i])), None
        except Exception as err:  # noqa: BLE001 - a bad image is a row with its error
            return i, None, f"{type(err).__name__}: {err}"


def _images_of(cursor: Any) -> list[bytes]:
    """A shard's image members, in sample order (the label and checksum members left out)."""
    from .data.manifest import CRC_EXT

    out = []
    for _key, members in cursor.read_many(0, 1 << 62):
        out.append(next(v for k, v in members.items() if k not in ("cls", CRC_EXT)))
    cursor.close()
    return out


def _collate(batch: list) -> list:
    return batch


def _batches(items: list[Item], clf: Any, cfg: ScoreConfig) -> Iterator[list]:
    # shard-set items stay in order within a worker's contiguous range: one shard in memory
    ds = _Images(items, clf, cfg.s3)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=cfg.num_workers, collate_fn=_collate)
    yield from loader


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score ``cfg.input`` with ``cfg.model`` into ``cfg.output``; returns the run's summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from .registry.predict import load_model
    from .tracking import Tracker

    t0 = time.monotonic()
    items, digest = list_input(cfg)
    pyfunc = load_model(cfg.model, cfg.tracking)
    clf = pyfunc.unwrap_python_model()
    version = _version_of(cfg, pyfunc)
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
                for batch in _batches(items, clf, cfg):
                    good = [(i, t) for i, t, _ in batch if t is not None]
                    probs = np.zeros((0, len(clf.classes)), np.float32)
                    if good:
                        x = torch.stack([t for _, t in good]).to(clf.device)
                        with torch.inference_mode():
                            probs = torch.softmax(clf.model(x).float(), -1).cpu().numpy()
                    row_of = {i: r for r, (i, _) in enumerate(good)}
                    cols: dict[str, list] = {c: [] for c in schema.names}
                    for i, _t, err in batch:
                        cols["key"].append(items[i].key)
                        cols["model_version"].append(version)
                        cols["error"].append(err)
                        if err is not None:
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
                    bar.update(len(batch))
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


def _version_of(cfg: ScoreConfig, pyfunc: Any) -> str:
    """The registered version behind ``cfg.model`` (``models:/name@alias`` resolved)."""
    from mlflow import MlflowClient

    from .tracking import resolve_uri
    ref = cfg.model[len("models:/"):] if cfg.model.startswith("models:/") else ""
    if not ref or ref.startswith("m-"):
        return ""
    client = MlflowClient(resolve_uri(cfg.tracking))
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    return ref.split("/", 1)[1] if "/" in ref else ""
