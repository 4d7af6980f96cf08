"""The shard stage: a source -> WebDataset tar shards + ``manifest.json`` (written last).

Why it looks like this:

* Splits are cut into chunks of ``max_samples_per_shard`` samples, planned up front from the
  seed, so the shards (and their hashes) do not depend on which process wrote what. Each chunk
  is written by ``webdataset.ShardWriter``, which starts a new part when ``max_bytes_per_shard``
  is reached: names are ``<split>-<chunk:05d>-<part:02d>.tar``.
* Every shard is written through :func:`vitpipe.storage.atomic_write` (temp + rename locally;
  upload-then-appear on S3), and the manifest goes last, so an interrupted run leaves nothing a
  reader could take for complete. Overwriting deletes the old manifest first.
* Images are fully decoded while writing (a corrupt source image fails here, naming the file),
  converted to the dataset's channels, and summed into per-channel mean/std.
* Every sample gets a ``.crc`` member (:func:`~vitpipe.data.manifest.sample_crc`: CRC-32 of its
  label and image members), which the loader checks by default: a changed byte is a counted
  skip naming the shard and key, not silently different training data.
* The train split is stored in a seeded shuffled order (val is carved from it by the same
  permutation when the source has no val split), so each shard holds a class mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .. import storage
from ..config.data import ShardConfig
from ..errors import DataError
from . import images, versions
from .manifest import (
    CRC_EXT,
    MANIFEST_NAME,
    Manifest,
    ManifestNotFound,
    ShardInfo,
    SplitInfo,
    dataset_digest,
    read_manifest,
    sample_crc,
    split_digest,
    write_manifest,
)
from .sources import Source, open_source

log = logging.getLogger(__name__)
SPLIT_ORDER = ("train", "val", "test")


@dataclass
class _Task:
    split: str  # output split
    chunk: int
    src_split: str  # the source split the indices refer to
    indices: np.ndarray


@dataclass
class _Result:
    split: str
    chunk: int
    shards: list[ShardInfo]
    stats: images.PixelStats
    class_counts: np.ndarray
    sizes: set[tuple[int, int]] = field(default_factory=set)
    exts: set[str] = field(default_factory=set)


_STATE: dict[str, Any] = {}


def config_digest(cfg: ShardConfig) -> str:
    """Hash of the settings that change shard contents (not output, workers, overwrite, s3)."""
    return hashlib.sha256(json.dumps(_content_config(cfg), sort_keys=True).encode()).hexdigest()


def _content_config(cfg: ShardConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={"output", "workers", "overwrite", "s3",
                                                "on_source_change", "grow_test"})


def _plan(source: Source, cfg: ShardConfig) -> list[_Task]:
    """Chunks per split, from the source sizes, limit and seed alone."""
    sizes = source.splits()
    limit = cfg.source.limit_per_split
    rng = np.random.default_rng(cfg.seed)
    order: dict[str, tuple[str, np.ndarray]] = {}
    n_train = min(sizes.get("train", 0), limit or sys.maxsize)
    perm = rng.permutation(n_train)
    if "val" not in sizes and cfg.val_fraction > 0:
        n_val = int(round(n_train * cfg.val_fraction))
        order["train"] = ("train", perm[n_val:])
        if n_val:
            order["val"] = ("train", np.sort(perm[:n_val]))
    else:
        order["train"] = ("train", perm)
    for split in ("val", "test"):
        if split in sizes:
            order[split] = (split, np.arange(min(sizes[split], limit or sys.maxsize)))
    tasks = []
    step = cfg.max_samples_per_shard
    for split in SPLIT_ORDER:
        if split not in order:
            continue
        src_split, idx = order[split]
        for chunk, start in enumerate(range(0, len(idx), step)):
            tasks.append(_Task(split, chunk, src_split, idx[start:start + step]))
    if not tasks or "train" not in order or len(order["train"][1]) == 0:
        raise DataError(f"source {cfg.source.path} has no training images to shard")
    return tasks


def _init_worker(source: Source, cfg: ShardConfig, channels: int, counter: Any) -> None:
    _STATE.update(source=source, cfg=cfg, channels=channels, counter=counter)


def _encode(sample_data: bytes, img, mode: str, cfg: ShardConfig) -> tuple[str, bytes]:
    """The member extension and bytes to store for one decoded image."""
    converted = img.mode != mode
    if cfg.image_format == "jpeg":
        return "jpg", images.encode(img.convert(mode), "jpeg", cfg.jpeg_quality)
    own = images.ext_of(img)
    if cfg.image_format == "keep" and not converted:
        return own, sample_data
    if cfg.image_format == "png" and own == "png" and not converted:
        return "png", sample_data
    return "png", images.encode(img.convert(mode), "png")


def _write_task(task: _Task) -> _Result:
    """Write one chunk as one or more shards; nothing is published if anything fails."""
    import webdataset as wds

    source: Source = _STATE["source"]
    cfg: ShardConfig = _STATE["cfg"]
    channels: int = _STATE["channels"]
    counter = _STATE.get("counter")
    mode = "L" if channels == 1 else "RGB"
    out = cfg.output.rstrip("/") if "://" in cfg.output else cfg.output
    stats = images.PixelStats(channels)
    res = _Result(task.split, task.chunk, [], stats, np.zeros(len(source.classes), np.int64))
    open_files: dict[str, tuple[Any, Any]] = {}

    def opener(fname: str):
        cm = storage.atomic_write(storage.join(out, fname), cfg.s3)
        open_files[fname] = (cm, cm.__enter__())
        return open_files[fname][1]

    def post(fname: str) -> None:
        cm, f = open_files.pop(fname)
        cm.__exit__(None, None, None)
        res.shards.append(ShardInfo(name=fname, count=writer.count, bytes=f.nbytes,
                                    sha256=f.sha256))

    writer = wds.ShardWriter(f"{task.split}-{task.chunk:05d}-%02d.tar",
                             maxcount=cfg.max_samples_per_shard, maxsize=cfg.max_bytes_per_shard,
                             opener=opener, post=post, verbose=0, encoder=False, mtime=0)
    done = 0
    try:
        for i in task.indices:
            s = source.sample(task.src_split, int(i))
            img = s.image if s.image is not None else images.decode(s.data, s.origin)
            images.channels_of(img, s.origin)
            conv = images.to_mode(img, mode, s.origin)
            stats.add(conv)
            res.class_counts[s.label] += 1
            res.sizes.add((conv.height, conv.width))
            ext, data = _encode(s.data, img, mode, cfg)
            res.exts.add(ext)
            members = {ext: data, "cls": str(s.label).encode()}
            members[CRC_EXT] = b"%08x" % sample_crc(members)
            writer.write({"__key__": s.key, **members})
            done += 1
            if counter is not None and done % 64 == 0:
                with counter.get_lock():
                    counter.value += 64
        writer.close()
    except BaseException as err:
        for cm, _ in open_files.values():  # drop unpublished temp files
            with contextlib.suppress(BaseException):
                cm.__exit__(type(err), err, None)
        raise
    if counter is not None:
        with counter.get_lock():
            counter.value += done % 64
    return res


def _detect_channels(source: Source, cfg: ShardConfig) -> int:
    if cfg.channels:
        return cfg.channels
    fixed = source.fixed_channels()
    if fixed:
        return fixed
    s = source.sample("train", 0)
    return images.channels_of(images.decode(s.data, s.origin), s.origin)


def _run(tasks: list[_Task], source: Source, cfg: ShardConfig, channels: int) -> list[_Result]:
    """Run the chunk writers in ``cfg.workers`` processes with a samples/s + ETA bar."""
    from tqdm import tqdm

    total = sum(len(t.indices) for t in tasks)
    workers = min(cfg.workers, len(tasks))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    counter = ctx.Value("q", 0)
    bar = tqdm(total=total, unit="img", desc=f"shard -> {cfg.output}", smoothing=0.1,
               mininterval=1.0 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)
    results: list[_Result] = []
    try:
        if workers <= 1:
            _init_worker(source, cfg, channels, counter)
            for t in tasks:
                results.append(_write_task(t))
                bar.update(counter.value - bar.n)
            return results
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(source, cfg, channels, counter)) as ex:
            pending = {ex.submit(_write_task, t) for t in tasks}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        results.append(f.result())
                    bar.update(counter.value - bar.n)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        return results
    finally:
        bar.close()


def _split_infos(results: list[_Result], n_classes: int, channels: int
                 ) -> tuple[dict[str, SplitInfo], set[tuple[int, int]], set[str]]:
    """Per output split: its shards in chunk order, counts and pixel statistics."""
    splits: dict[str, SplitInfo] = {}
    sizes: set[tuple[int, int]] = set()
    exts: set[str] = set()
    for split in SPLIT_ORDER:
        rs = sorted((r for r in results if r.split == split), key=lambda r: r.chunk)
        if not rs:
            continue
        stats = images.PixelStats(channels)
        counts = np.zeros(n_classes, np.int64)
        shards: list[ShardInfo] = []
        for r in rs:
            stats.merge(r.stats)
            counts += r.class_counts
            shards += sorted(r.shards, key=lambda s: s.name)
            sizes |= r.sizes
            exts |= r.exts
        mean, std = stats.mean_std()
        splits[split] = SplitInfo(count=sum(s.count for s in shards), shards=shards,
                                  digest=split_digest(shards), class_counts=counts.tolist(),
                                  mean=mean, std=std)
    return splits, sizes, exts


def _assemble(results: list[_Result], source: Source, cfg: ShardConfig, channels: int,
              cfg_digest: str) -> Manifest:
    splits, sizes, exts = _split_infos(results, len(source.classes), channels)
    train_mean, train_std = splits["train"].mean, splits["train"].std
    from .. import __version__ as version

    return Manifest(
        source=source.info(), config=_content_config(cfg), config_digest=cfg_digest,
        classes=source.classes, channels=channels,
        image_size=next(iter(sizes)) if len(sizes) == 1 else None,
        image_format="+".join(sorted(exts)), mean=train_mean, std=train_std, splits=splits,
        digest=dataset_digest(splits), created_at=datetime.now(timezone.utc).isoformat(),
        vitpipe_version=version, sample_crc=True,
    )


def _existing(uri: str, cfg: ShardConfig) -> Manifest | None:
    try:
        return read_manifest(uri, cfg.s3)
    except ManifestNotFound:
        return None
    except DataError:
        if cfg.overwrite:
            return None
        raise


def shard(cfg: ShardConfig) -> str:
    """Shard ``cfg.source`` into ``cfg.output``; returns the manifest URI.

    Idempotent: when a manifest for the same source and settings exists, nothing is done (and
    logged as such); ``overwrite`` rebuilds. A source that changed under the same settings
    becomes a new dataset version (:mod:`vitpipe.data.versions`): its new images appended as
    new shards when it only grew, else re-sharded whole.
    """
    out = cfg.output.rstrip("/") if "://" in cfg.output else cfg.output
    uri = storage.join(out, MANIFEST_NAME)
    storage.check_bucket(out, cfg.s3)
    source = open_source(cfg.source, cfg.s3)
    digest = config_digest(cfg)
    old = _existing(uri, cfg)
    parent = None
    if old is not None and not cfg.overwrite:
        if old.source.digest == source.info().digest and old.config_digest == digest and \
                not (cfg.grow_test and _test_left_out(source, old, cfg)):
            log.info("shards at %s are up to date (source %s, digest %s): nothing to do",
                     out, old.source.digest[:12], old.digest[:12])
            return uri
        if old.config_digest != digest or cfg.on_source_change == "refuse":
            what = ("made with different settings" if old.config_digest != digest
                    else "of a different source (on_source_change=refuse)")
            raise DataError(f"{out} already holds shards {what} (manifest {uri}); "
                            "set overwrite=true (`vitpipe shard --overwrite`) or choose another "
                            "output")
        parent = old
        change = _change(source, cfg, old)
        if change.rebuild is None:
            return _append(source, cfg, old, change, out)
        log.info("source %s changed: %s; re-sharding it whole as version %d", cfg.source.path,
                 change.rebuild, old.version + 1)
        versions.archive(parent, out, cfg.s3)  # before the manifest is deleted
    if storage.exists(uri, cfg.s3):
        storage.delete(uri, cfg.s3)  # first: from now on readers see "incomplete"
    channels = _detect_channels(source, cfg)
    tasks = _plan(source, cfg)
    t0 = time.monotonic()
    results = _run(tasks, source, cfg, channels)
    manifest = _assemble(results, source, cfg, channels, digest)
    if parent is not None:
        manifest.version, manifest.parent = parent.version + 1, parent.digest
    index = _index(source) if cfg.source.limit_per_split is None else None
    if index is not None:  # before the manifest that names it
        manifest.index = versions.write_index(out, manifest.digest, index, cfg.s3)
    write_manifest(manifest, out, cfg.s3)
    _remove_stale(out, cfg, old, manifest)
    n = sum(s.count for s in manifest.splits.values())
    dt = time.monotonic() - t0
    log.info("sharded %d images into %d shards at %s in %.1fs (%.0f img/s): %s", n,
             sum(len(s.shards) for s in manifest.splits.values()), out, dt, n / max(dt, 1e-9),
             ", ".join(f"{k}={v.count}" for k, v in manifest.splits.items()))
    return uri


def _test_left_out(source: Source, old: Manifest, cfg: ShardConfig) -> bool:
    """Test images an earlier run left out of the holdout (``grow_test`` was false)."""
    index = versions.read_index(old, cfg.s3)
    n = source.splits().get("test", 0)
    return index is not None and len(index.get("test", {})) < n


def _index(source: Source) -> dict[str, dict[str, str]] | None:
    prints = {split: source.fingerprints(split) for split in source.splits()}
    return None if any(v is None for v in prints.values()) else prints  # type: ignore[misc]


def _change(source: Source, cfg: ShardConfig, old: Manifest) -> versions.Change:
    if source.classes != old.classes:
        return versions.Change(rebuild=f"the classes changed ({len(old.classes)} -> "
                                       f"{len(source.classes)})")
    if cfg.source.limit_per_split is not None:
        return versions.Change(rebuild="source.limit_per_split is set")
    return versions.diff(versions.read_index(old, cfg.s3), _index(source),
                         grow_test=cfg.grow_test)


def _append(source: Source, cfg: ShardConfig, old: Manifest, change: versions.Change,
            out: str) -> str:
    """The new images as new shards; a manifest listing old and new shards (version + 1)."""
    uri = storage.join(out, MANIFEST_NAME)
    if change.ignored:
        log.info("the test split is a fixed holdout: left out %s new image(s) of source split(s) "
                 "%s (set grow_test=true to add them)", sum(change.ignored.values()),
                 ", ".join(change.ignored))
    if not change.count:
        return uri
    version = old.version + 1
    carve = "val" not in source.splits() and cfg.val_fraction > 0
    rng = np.random.default_rng([cfg.seed, version])
    tasks: list[_Task] = []
    for src_split, keys in change.added.items():
        position = {k: i for i, k in enumerate(source.fingerprints(src_split) or {})}
        idx = np.array([position[k] for k in keys], np.int64)
        groups = {src_split: idx}
        if src_split == "train":
            to_val = np.array([carve and versions.goes_to_val(k, cfg.seed, cfg.val_fraction)
                               for k in keys], bool)
            groups = {"train": rng.permutation(idx[~to_val]), "val": np.sort(idx[to_val])}
        for split, ids in groups.items():
            taken = [int(s.name.split("-")[1]) for s in old.splits[split].shards] \
                if split in old.splits else []
            first = max(taken, default=-1) + 1
            step = cfg.max_samples_per_shard
            tasks += [_Task(split, first + c, src_split, ids[s:s + step])
                      for c, s in enumerate(range(0, len(ids), step))]
    t0 = time.monotonic()
    results = _run(tasks, source, cfg, old.channels)
    new, sizes, exts = _split_infos(results, len(old.classes), old.channels)
    splits = dict(old.splits)
    for name, add in new.items():
        before = splits.get(name)
        if before is None:
            splits[name] = add
            continue
        shards = before.shards + add.shards
        # pixel statistics stay the parent's: a warm-started model keeps its input scaling
        splits[name] = before.model_copy(update={
            "count": before.count + add.count, "shards": shards, "digest": split_digest(shards),
            "class_counts": [a + b for a, b in zip(before.class_counts, add.class_counts,
                                                    strict=True)]})
    size = old.image_size if old.image_size and sizes <= {tuple(old.image_size)} else None
    manifest = old.model_copy(update={
        "source": source.info(), "splits": splits, "digest": dataset_digest(splits),
        "image_size": size, "image_format": "+".join(sorted(set(old.image_format.split("+"))
                                                            | exts)),
        "created_at": datetime.now(timezone.utc).isoformat(), "version": version,
        "parent": old.digest})
    versions.archive(old, out, cfg.s3)
    index = versions.read_index(old, cfg.s3) or {}
    prints = {s: source.fingerprints(s) or {} for s in change.added}
    for s, keys in change.added.items():
        index.setdefault(s, {}).update({k: prints[s][k] for k in keys})
    manifest.index = versions.write_index(out, manifest.digest, index, cfg.s3)
    write_manifest(manifest, out, cfg.s3)  # last: the new version is complete
    log.info("dataset version %d at %s: %d new image(s) in %d new shard(s) in %.1fs, %d shard(s) "
             "reused; parent %s: %s", version, out, change.count,
             sum(len(r.shards) for r in results), time.monotonic() - t0,
             sum(len(s.shards) for s in old.splits.values()), old.digest[:12],
             ", ".join(f"{k}={v.count}" for k, v in splits.items()))
    return uri


def _remove_stale(out: str, cfg: ShardConfig, old: Manifest | None, new: Manifest) -> None:
    """Delete shards of a replaced manifest, and leftover local temp files of killed runs."""
    keep = {s.name for sp in new.splits.values() for s in sp.shards}
    if old is not None:
        if old.index and old.index != new.index:
            storage.delete(storage.join(out, old.index), cfg.s3)
        for sp in old.splits.values():
            for s in sp.shards:
                if s.name not in keep:
                    storage.delete(storage.join(out, s.name), cfg.s3)
    if not storage.is_s3(out):
        for p in storage.local_path(out).glob(".*.tmp-*"):
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > 60:
                    p.unlink()
