"""Manifest -> per-rank batches: ``make_loader`` (webdataset ``WebLoader`` over planned shards).

Guarantees (see :mod:`vitpipe.data.plan` for how):

* ``train=True``: every rank yields exactly ``len(loader)`` full batches, derived from the
  manifest; the order is a pure function of (seed, epoch, rank, world_size, num_workers,
  batch_size, shuffle_buffer), and ``start_sample=k`` yields exactly the rest of that order,
  skipping the first ``k`` samples' tar members without copying or decoding them. Augmentation
  randomness is seeded per batch, so a resumed batch is augmented as it would have been. Resume
  with the same world_size, num_workers and batch_size.
* ``train=False``: every sample exactly once across ranks; ranks are padded with label ``-1`` to
  the same batch count and sizes (drop ``labels < 0``).
* A corrupt image is skipped and counted (logged with shard and key): in training it is replaced
  by the worker's next good sample so batch counts stay equal; in evaluation it becomes a
  label ``-1`` pad. Past ``max_bad_fraction`` of a worker's samples the loader raises
  :class:`DataError` naming the worst shards. Unreadable shards count all their missing samples
  as bad; unsafe shards (absolute/``..`` member paths) fail at once.
* Integrity, by default (``data.verify_sample_crc``): each sample's ``.crc`` member (CRC-32 of
  its label and image, written by ``vitpipe shard``) is checked before decoding; a changed byte
  is a bad sample as above. Shard sets made before ``.crc`` existed are read unchecked (one log
  line). ``verify_sha256`` additionally hashes whole shards against the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import storage
from ..config.data import DataConfig, S3Config
from ..errors import DataError
from . import images
from .manifest import CRC_EXT, Manifest, read_manifest, sample_crc
from .plan import PAD, EpochPlan, WorkerPlan, make_plan
from .tario import ShardError, TarCursor, UnsafeShardError
from .transforms import split_batchable, transform_batch

log = logging.getLogger(__name__)


def register_s3_gopen() -> None:
    """Let ``webdataset.WebDataset("s3://...")`` stream through boto3 (no AWS CLI pipes)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports
    # a function of the same name)

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
        if "r" not in mode:
            raise DataError(f"s3 URLs are read-only in webdataset: {url}")
        return storage.open_read(url)

    gopen.gopen_schemes["s3"] = gopen_s3


register_s3_gopen()


_IMAGE_EXTS = frozenset(images.IMAGE_EXTS)
_MAX_KEYS = 10_000  # damaged samples' keys a worker reports back (all are counted)


@dataclass
class _Failure:
    message: str


@dataclass
class WorkerReport:
    """What a worker saw: samples yielded, bad ones per shard (with a reason), padding."""

    worker: int
    samples: int = 0
    padded: int = 0
    bad: Counter = field(default_factory=Counter)
    reasons: dict[str, str] = field(default_factory=dict)
    keys: list[tuple[int, str]] = field(default_factory=list)  # (shard, key) of damaged samples


@dataclass
class _Missing:
    shard: int
    key: str
    reason: str


class _ShardReader:
    """Fetches (shard, member) items in read order, one open shard at a time."""

    def __init__(self, manifest: Manifest, split: str, s3: S3Config | None):
        self.urls = manifest.shard_urls(split)
        self.info = manifest.split(split).shards
        self.s3 = s3
        self.cur: TarCursor | None = None
        self.cur_shard = -1
        self.failed: dict[int, str] = {}

    def fetch(self, shard: int, member: int, count: int = 1
              ) -> list[tuple[str, dict[str, bytes]] | _Missing]:
        """Samples ``member .. member + count - 1`` of ``shard``, each as (key, {ext: bytes})
        or why it is missing."""
        if shard != self.cur_shard and shard not in self.failed:
            self.close()
            self.cur_shard = shard
            try:
                self.cur = TarCursor(self.urls[shard], self.s3, self.info[shard].bytes)
            except UnsafeShardError:
                raise
            except ShardError as err:
                self.failed[shard] = err.reason
        got: list = []
        cur = self.cur
        if shard not in self.failed:
            assert cur is not None
            try:
                got = cur.read_many(member, count)
            except UnsafeShardError:
                raise
            except ShardError as err:
                self.failed[shard] = err.reason
                self.close()
        if len(got) < count:
            if shard not in self.failed:
                assert cur is not None
                self.failed[shard] = (cur.error.reason if cur.error is not None else
                                      f"ended after {cur.index + 1} samples; the manifest says "
                                      f"{self.info[shard].count} (truncated?)")
            got += [_Missing(shard, f"#{m}", self.failed[shard])
                    for m in range(member + len(got), member + count)]
        return got

    def close(self) -> None:
        if self.cur is not None:
            self.cur.close()
        self.cur, self.cur_shard = None, -1


def _default_transform() -> Callable[[Image.Image], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class _EpochDataset(torch.utils.data.IterableDataset):
    """Runs inside each DataLoader worker: read its planned items, decode, transform, batch."""

    def __init__(self, manifest: Manifest, plan: EpochPlan, transform: Callable | None,
                 s3: S3Config | None, max_bad_fraction: float, with_keys: bool,
                 physical_workers: int, decode: str = "tensor", verify_crc: bool = True):
        super().__init__()
        self.decode = decode
        self.verify_crc = verify_crc
        self.crc_required = verify_crc and manifest.sample_crc
        self.num_classes = len(manifest.classes)
        self.channels = manifest.channels
        self.image_ext = ""  # the image member's extension, once seen
        self.manifest, self.plan, self.s3 = manifest, plan, s3
        self.transform, self.batch_tail = split_batchable(transform or _default_transform())
        self.plain = self.transform is None  # batch-only transforms: no tv_tensor dispatch
        self.max_bad_fraction = max_bad_fraction
        self.with_keys = with_keys
        self.physical_workers = physical_workers

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        w = self.plan.physical_to_logical(physical, self.physical_workers)
        wp = self.plan.worker(w)
        report = WorkerReport(w)
        reader = _ShardReader(self.manifest, self.plan.split, self.s3)
        try:
            yield from self._batches(wp, reader, report)
        except _Stop as stop:
            yield _Failure(stop.message)
            return
        except UnsafeShardError as err:
            yield _Failure(str(err))
            return
        finally:
            reader.close()
        yield report

    # -- per sample ---------------------------------------------------------------------------

    def _budget_check(self, wp: WorkerPlan, report: WorkerReport) -> None:
        allowed = int(self.max_bad_fraction * max(wp.real_items, 1))
        if sum(report.bad.values()) > allowed:
            worst = self._worst(report)
            n_bad = sum(report.bad.values())
            raise _Stop(f"too many bad samples in split '{self.plan.split}' ({n_bad} "
                        f"of {wp.real_items} in worker {wp.worker}, max_bad_fraction="
                        f"{self.max_bad_fraction}); worst shards: {worst} (under "
                        f"{self.manifest.base}); re-shard or raise data.max_bad_fraction")

    def _worst(self, report: WorkerReport) -> str:
        names = self.manifest.split(self.plan.split).shards
        return ", ".join(
            f"{names[s].name} ({n} bad: {report.reasons.get(str(s), 'corrupt images')})"
            for s, n in report.bad.most_common(3))

    def _bad(self, wp: WorkerPlan, report: WorkerReport, shard: int, key: str, reason: str,
             lost: bool = False) -> None:
        """Count a bad sample; ``lost``: one of an unreadable shard's samples (logged 3 times
        per shard; a damaged sample is logged every time, with its key)."""
        report.bad[shard] += 1
        report.reasons.setdefault(str(shard), reason)
        name = self.manifest.split(self.plan.split).shards[shard].name
        if not lost:
            if len(report.keys) < _MAX_KEYS:
                report.keys.append((shard, key))
            log.warning("skipping sample %s in shard %s: %s", key, name, reason)
        elif report.bad[shard] <= 3:  # a lost shard would otherwise log every one of its samples
            more = " (more in this shard: counted, not logged)" if report.bad[shard] == 3 else ""
            log.warning("skipping sample %s in shard %s: %s%s", key, name, reason, more)
        self._budget_check(wp, report)

    def _decode(self, key: str, members: dict[str, bytes]) -> tuple[Any, int]:
        if self.verify_crc:
            stored = members.get(CRC_EXT)
            if stored is not None:
                try:
                    want = int(stored, 16)
                except ValueError:
                    raise DataError(f"bad .crc member {bytes(stored[:20])!r}") from None
                got = sample_crc(members)
                if got != want:
                    raise DataError(f"checksum mismatch: crc32 {got:08x}, the sample's .crc says "
                                    f"{want:08x} (its bytes changed after `vitpipe shard` wrote "
                                    "them)")
            elif self.crc_required:
                raise DataError("no .crc checksum member (this shard set has one per sample)")
        data = members.get(self.image_ext)  # a shard's samples all have the same members
        if data is None:
            for e in members:
                if e in _IMAGE_EXTS:
                    self.image_ext, data = e, members[e]
                    break
            else:
                raise DataError(f"no image member (has {', '.join(members) or 'nothing'})")
        cls = members.get("cls")
        if cls is None:
            raise DataError("no .cls label member")
        try:
            label = int(cls)  # ASCII digits; int() strips the whitespace
        except ValueError:
            raise DataError(f"label {cls[:20]!r} is not an integer") from None
        if not 0 <= label < self.num_classes:
            raise DataError(f"label {label} outside 0..{self.num_classes - 1}")
        if self.decode == "tensor":
            return images.decode_tensor(data, self.image_ext, self.channels, key,
                                        plain=self.plain), label
        img = images.decode(data, key)
        return images.to_mode(img, self.manifest.mode, key), label

    def _pad_image(self) -> Any:
        h, w = self.manifest.image_size or (32, 32)
        if self.decode == "tensor":
            from torchvision import tv_tensors

            return torch.zeros(self.manifest.channels, h, w, dtype=torch.uint8).as_subclass(
                tv_tensors.Image)
        return Image.new(self.manifest.mode, (w, h))

    # -- per worker ---------------------------------------------------------------------------

    def _batches(self, wp: WorkerPlan, reader: _ShardReader, report: WorkerReport
                 ) -> Iterator[Any]:
        """The worker's batches: samples fetched in read order and emitted in the plan's order,
        holding only those read but not yet emitted (at most the shuffle buffer); samples
        consumed before ``skip`` are never fetched. A bad sample is replaced by the last good
        one (train) or by a label -1 pad (eval). One loop, no per-sample generators: on small
        images this glue costs as much as reading the tar."""
        plan, decode, train = self.plan, self._decode, self.plan.train
        mask = np.zeros(len(wp.shard), bool)
        mask[wp.emit[wp.skip:]] = True
        # Python lists: indexing numpy arrays per sample costs ~0.1 us per access
        needed, shards, member_of = mask.tolist(), wp.shard.tolist(), wp.member.tolist()
        run_end = _read_runs(wp.shard, wp.member, mask).tolist()
        emit = wp.emit[wp.skip:].tolist()
        held: dict[int, tuple[str, dict[str, bytes]] | _Missing | None] = {}
        next_read = next_emit = 0
        last_good: tuple[Any, int, str] | None = None  # train: replaces a bad sample
        owed = 0  # train: bad samples seen before any good one, not yet replaced
        pad_img = None
        for batch_id, size in zip(wp.batch_ids, wp.batch_sizes, strict=True):
            imgs: list[Any] = []
            labels: list[int] = []
            keys: list[str] = []
            pads = 0
            while len(imgs) < size:
                if owed and (imgs or last_good is not None):
                    img, label, key = (imgs[-1], labels[-1], keys[-1]) if imgs else last_good
                    imgs.append(img)
                    labels.append(label)
                    keys.append(key)
                    owed -= 1
                    continue
                if next_emit == len(emit):
                    if last_good is None and not imgs:
                        raise _Stop(f"every sample worker {wp.worker} of rank {plan.rank} was "
                                    f"planned to read in split '{plan.split}' is bad: "
                                    f"{self._worst(report)}; nothing to train on")
                    raise _Stop(f"worker {wp.worker} ran out of samples in split "
                                f"'{plan.split}' (plan error)")
                e = emit[next_emit]
                next_emit += 1
                while e not in held:  # read on: a run of samples of one shard at a time
                    pos = next_read
                    if not needed[pos]:
                        next_read += 1
                    elif shards[pos] == PAD:
                        held[pos] = None
                        next_read += 1
                    else:
                        next_read = run_end[pos]
                        held.update(zip(range(pos, next_read),
                                        reader.fetch(shards[pos], member_of[pos], next_read - pos),
                                        strict=True))
                item = held.pop(e)
                if type(item) is tuple:
                    key, members = item
                    try:
                        img, label = decode(key, members)
                    except DataError as err:
                        self._bad(wp, report, shards[e], key, str(err))
                    else:
                        imgs.append(img)
                        labels.append(label)
                        keys.append(key)
                        continue
                elif item is not None:
                    self._bad(wp, report, item.shard, item.key, item.reason, lost=True)
                elif not train:
                    report.padded += 1
                # a bad sample, or padding
                if train:
                    if imgs or last_good is not None:
                        img, label, key = (imgs[-1], labels[-1], keys[-1]) if imgs else last_good
                        imgs.append(img)
                        labels.append(label)
                        keys.append(key)
                    else:
                        owed += 1
                    continue
                if pad_img is None:
                    pad_img = self._pad_image()
                imgs.append(pad_img)
                labels.append(-1)
                keys.append("")
                pads += 1
            if train:
                last_good = imgs[-1], labels[-1], keys[-1]
            yield self._collate(imgs, labels, keys, batch_id)
            report.samples += len(labels) - pads

    def _collate(self, imgs: list[Any], labels: list[int], keys: list[str], batch_id: int
                 ) -> Any:
        plan = self.plan
        gen_seed = hash((plan.seed, plan.epoch, plan.rank, batch_id, 0xA06)) & (2**63 - 1)
        worker = torch.utils.data.get_worker_info() is not None
        # a worker process's global RNG is its own; inline, the caller's is kept as it was
        with contextlib.nullcontext() if worker else torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(gen_seed)  # CPU only: no CUDA lazy-init cost
            try:
                x = transform_batch(self.transform, self.batch_tail, imgs, shared=worker)
            except DataError as err:
                raise _Stop(str(err)) from None
        y = torch.tensor(labels, dtype=torch.long)
        if self.with_keys:
            return x, y, keys
        return x, y


_READ_RUN = 64  # samples fetched per call at most (held beyond the shuffle buffer)


def _read_runs(shard: np.ndarray, member: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """For each read position, the end of its run: needed samples of one shard with
    consecutive member indices, at most ``_READ_RUN`` long (padding and unneeded positions: a
    run of one). A worker with no batch (a split smaller than its workers' batches) has none."""
    n = len(shard)
    if n == 0:
        return np.zeros(0, np.int64)
    cut = np.ones(n, bool)
    cut[1:] = ((shard[1:] != shard[:-1]) | (member[1:] != member[:-1] + 1) | ~needed[1:]
               | ~needed[:-1] | (shard[1:] == PAD))
    starts = np.flatnonzero(cut)
    ends = np.append(starts[1:], n)
    pos = np.arange(n)
    start_of = np.repeat(starts, ends - starts)
    return np.minimum(np.repeat(ends, ends - starts),
                      start_of + ((pos - start_of) // _READ_RUN + 1) * _READ_RUN)


class _Stop(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


_unchecked_logged: set[str] = set()  # shard sets without .crc members, logged once each
_sha_cache: dict[tuple[str, str], bool] = {}
_sha_lock = threading.Lock()


def _verify(manifest: Manifest, split: str, shards: set[int], s3: S3Config | None) -> None:
    infos = manifest.split(split).shards
    urls = manifest.shard_urls(split)
    for i in sorted(shards):
        key = (urls[i], infos[i].sha256)
        with _sha_lock:
            if key in _sha_cache:
                continue
        try:
            got = storage.sha256(urls[i], s3)
        except DataError as err:
            raise DataError(f"cannot verify shard {urls[i]}: {err}") from None
        if got != infos[i].sha256:
            raise DataError(f"shard {urls[i]} has sha256 {got[:16]}... but the manifest says "
                            f"{infos[i].sha256[:16]}...: the shard was modified or corrupted; "
                            "re-run `vitpipe shard --overwrite`")
        with _sha_lock:
            _sha_cache[key] = True


class ShardLoader:
    """Iterable of ``(images (B, C, H, W) float, labels (B,) long)`` for one rank's epoch."""

    def __init__(self, manifest: Manifest, plan: EpochPlan, dataset: _EpochDataset,
                 loader: Any):
        self.manifest, self.plan = manifest, plan
        self._dataset, self._loader = dataset, loader
        self.reports: list[WorkerReport] = []

    def __len__(self) -> int:
        return self.plan.remaining_batches

    @property
    def bad_samples(self) -> int:
        return sum(sum(r.bad.values()) for r in self.reports)

    @property
    def bad_keys(self) -> list[tuple[str, str]]:
        """(shard name, key) of each damaged sample skipped (samples of unreadable shards are
        counted in :attr:`bad_samples` only)."""
        names = self.manifest.split(self.plan.split).shards
        return [(names[s].name, k) for r in self.reports for s, k in r.keys]

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.reports)

    def __iter__(self) -> Iterator[Any]:
        self.reports = []
        n = 0
        for item in self._loader:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            if isinstance(item, WorkerReport):
                self.reports.append(item)
                continue
            n += 1
            yield item
        if n != len(self):
            raise DataError(f"loader for split '{self.plan.split}' rank {self.plan.rank} yielded "
                            f"{n} batches instead of {len(self)}")
        if self.bad_samples:
            per_shard: Counter = Counter()
            for r in self.reports:
                per_shard.update(r.bad)
            names = self.manifest.split(self.plan.split).shards
            log.warning("split '%s' rank %d: %d bad sample(s) skipped: %s", self.plan.split,
                        self.plan.rank, self.bad_samples,
                        ", ".join(f"{names[s].name}: {n}" for s, n in per_shard.most_common()))
        if not self.plan.train and self.plan.start_batch == 0:
            seen = self.samples + self.bad_samples
            if seen != self.plan.rank_samples:
                raise DataError(f"evaluation of split '{self.plan.split}' rank {self.plan.rank} "
                                f"saw {seen} samples, the plan has {self.plan.rank_samples} "
                                f"(manifest {self.manifest.uri})")


# DataConfig fields a call may override by name (``make_loader(..., num_workers=0)``)
READ_SETTINGS = frozenset({"num_workers", "shuffle_buffer", "max_bad_fraction", "verify_sha256",
                           "verify_sample_crc", "prefetch_factor", "s3"})


def make_loader(manifest_uri: str | Manifest, split: str, batch_size: int, rank: int = 0,
                world_size: int = 1, *, data: DataConfig | None = None, epoch: int = 0,
                start_sample: int = 0, train: bool = True, seed: int = 0,
                transform: Callable | None = None, decode: str = "tensor",
                with_keys: bool = False, pin_memory: bool = False,
                **settings: Any) -> ShardLoader:
    """One rank's loader for one epoch of ``split`` (see the module docstring for guarantees).

    How shards are read (workers, shuffle buffer, error budget, checksums, S3) comes from
    ``data`` (a :class:`DataConfig`, else its defaults); ``settings`` override those fields by
    name and are validated like the config. The other arguments say which part of the data
    this call reads: ``start_sample`` is what this rank already consumed in this epoch (a
    multiple of ``batch_size``); ``with_keys`` adds each batch's sample keys (``""`` for
    padding). ``decode="tensor"`` (default) hands ``transform`` uint8 ``tv_tensors.Image``
    (C, H, W) in the manifest's channels (torchvision's decoders: faster); ``"pil"`` hands it
    PIL images. ``pin_memory``: for a CUDA device.
    """
    if decode not in ("tensor", "pil"):
        raise DataError(f"decode must be 'tensor' or 'pil', got {decode!r}")
    d = data or DataConfig()
    if settings:
        unknown = sorted(set(settings) - READ_SETTINGS)
        if unknown:
            raise TypeError(f"make_loader() got unknown setting(s) {unknown}; the DataConfig "
                            f"fields it takes by name are {sorted(READ_SETTINGS)}")
        d = DataConfig.model_validate({**d.model_dump(), **settings})
    manifest = (manifest_uri if isinstance(manifest_uri, Manifest)
                else read_manifest(manifest_uri, d.s3))
    counts = [s.count for s in manifest.split(split).shards]
    plan = make_plan(counts, split, batch_size=batch_size, rank=rank, world_size=world_size,
                     num_workers=d.num_workers, epoch=epoch, seed=seed, train=train,
                     start_sample=start_sample, shuffle_buffer=d.shuffle_buffer)
    log.info("data plan (rank %d/%d): %s", rank, world_size, plan.derivation())
    if d.verify_sha256:
        _verify(manifest, split, {int(s) for s in np.unique(plan.shard) if s != PAD}, d.s3)
    if d.verify_sample_crc and not manifest.sample_crc and manifest.base not in _unchecked_logged:
        _unchecked_logged.add(manifest.base)
        log.info("shards under %s have no per-sample .crc members (made by an older vitpipe): "
                 "read without per-sample checksums; re-run `vitpipe shard --overwrite` to add "
                 "them", manifest.base)
    dataset = _EpochDataset(manifest, plan, transform, d.s3, d.max_bad_fraction, with_keys,
                            d.num_workers, decode, d.verify_sample_crc)
    import webdataset as wds

    kw: dict[str, Any] = {"prefetch_factor": d.prefetch_factor} if d.num_workers > 0 else {}
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=d.num_workers,
                           pin_memory=pin_memory, persistent_workers=False, **kw)
    return ShardLoader(manifest, plan, dataset, loader)


def steps_per_epoch(manifest_uri: str | Manifest, split: str, batch_size: int,
                    world_size: int = 1, *, train: bool = True,
                    s3: S3Config | None = None) -> int:
    """Batches per rank per epoch (what ``len(make_loader(...))`` is at ``start_sample=0``),
    without starting workers: for LR schedules and progress bars."""
    manifest = (manifest_uri if isinstance(manifest_uri, Manifest)
                else read_manifest(manifest_uri, s3))
    counts = [s.count for s in manifest.split(split).shards]
    return make_plan(counts, split, batch_size=batch_size, rank=0, world_size=world_size,
                     num_workers=1, epoch=0, seed=0, train=train).steps


__all__ = ["ShardLoader", "WorkerReport", "make_loader", "register_s3_gopen", "steps_per_epoch"]
