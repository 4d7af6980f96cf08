"""Epoch plans: which samples each rank and loader worker reads, in which order.

Why a plan instead of ``split_by_node``/``split_by_worker`` over whole shards: with shards of
different sizes, or fewer shards than ranks x workers, whole-shard splitting gives ranks
different batch counts and DDP hangs (webdataset #188, #225). Here everything is a pure function
of the manifest's per-shard counts and (seed, epoch, rank, world_size, num_workers, batch_size):

* train: shards are shuffled by (seed, epoch) and concatenated; ``steps = total // (world_size
  * batch_size)`` full batches per rank; rank ``r`` takes the ``r``-th contiguous run of
  ``steps * batch_size`` samples (a run may start or end inside a shard; the few samples past
  the last full batch are dropped, different ones each epoch).
* eval: shards in manifest order, split into ``world_size`` near-equal contiguous runs; every
  rank is padded (label -1) to the longest run so all have the same batch count and sizes.
* workers: rank batch ``j`` comes from logical worker ``j % num_workers``, matching the
  DataLoader's round-robin; each worker reads one contiguous slice of its rank's run.
* order: each worker's slice goes through a ``shuffle_buffer``-sized shuffle buffer (the
  algorithm of ``webdataset.shuffle``), but simulated on indices with a generator seeded by
  (seed, epoch, rank, worker): the whole emit order is known before any data is read. So the
  order from sample ``k`` on is known without replaying the first ``k``, and resuming reads only
  what is left (earlier tar members are skipped, not decoded), still streaming with bounded memory
  (an item is emitted at most ``shuffle_buffer`` reads after it was read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

PAD = -1  # shard index of a padding item (eval) -> label -1


@dataclass
class WorkerPlan:
    """What one logical worker yields: ``batch_ids`` (rank batch indices) of ``batch_sizes``."""

    worker: int
    shard: np.ndarray  # per item, in read order; PAD for padding
    member: np.ndarray  # sample index inside its shard
    emit: np.ndarray  # emit order: positions into shard/member
    batch_ids: list[int]
    batch_sizes: list[int]
    skip: int  # emitted samples already consumed (resume)

    @property
    def real_items(self) -> int:
        return int((self.shard != PAD).sum())


@dataclass
class EpochPlan:
    """One rank's epoch over one split."""

    split: str
    train: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int  # logical workers (>= 1)
    batch_size: int
    shuffle_buffer: int
    total: int  # samples in the split
    steps: int  # batches per rank this epoch (equal on every rank)
    rank_samples: int  # real samples this rank reads this epoch (before resume)
    rank_padding: int
    start_batch: int  # batches this rank already consumed (resume)
    shard: np.ndarray  # the rank's items in read order
    member: np.ndarray
    batch_sizes: list[int]  # of every rank batch this epoch

    @property
    def remaining_batches(self) -> int:
        return max(0, self.steps - self.start_batch)

    def derivation(self) -> str:
        if self.train:
            return (f"{self.split} epoch {self.epoch}: {self.total} samples // (world_size "
                    f"{self.world_size} x batch {self.batch_size}) = {self.steps} steps/epoch "
                    f"per rank; {self.total - self.steps * self.batch_size * self.world_size} "
                    f"dropped; {self.num_workers} worker(s) per rank; starting at batch "
                    f"{self.start_batch}")
        return (f"{self.split} eval: {self.total} samples over {self.world_size} rank(s): rank "
                f"{self.rank} reads {self.rank_samples} + {self.rank_padding} padding = "
                f"{self.steps} batches")

    def physical_to_logical(self, physical: int, physical_workers: int) -> int:
        """The DataLoader asks worker 0 first; after ``start_batch`` that must be the worker
        owning batch ``start_batch``, so physical ids are rotated."""
        return (physical + self.start_batch) % max(1, physical_workers)

    def worker(self, w: int) -> WorkerPlan:
        """The slice, order and batches of logical worker ``w``."""
        nw = self.num_workers
        ids = list(range(w, self.steps, nw))
        sizes = [self.batch_sizes[j] for j in ids]
        offset = sum(self.batch_sizes[j] for v in range(w) for j in range(v, self.steps, nw))
        n = sum(sizes)
        shard = self.shard[offset:offset + n]
        member = self.member[offset:offset + n]
        if self.train and self.shuffle_buffer > 1:
            emit = buffer_shuffle_order(n, self.shuffle_buffer,
                                        [self.seed, self.epoch, self.rank, w, 0xB10C])
        else:
            emit = np.arange(n)
        consumed = sum(1 for j in ids if j < self.start_batch)
        return WorkerPlan(w, shard, member, emit, ids[consumed:], sizes[consumed:],
                          skip=sum(sizes[:consumed]))


def buffer_shuffle_order(n: int, size: int, seed: list[int]) -> np.ndarray:
    """Emit order of ``n`` items read in order through a shuffle buffer of ``size``: once full,
    each read replaces a random buffered item, which is emitted; the rest leave shuffled."""
    size = min(size, n)
    if size <= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    buf = list(range(size))
    out: list[int] = []  # a list: a numpy item assignment per step costs 3x the loop
    emit = out.append
    for pos, k in zip(range(size, n), rng.integers(0, size, n - size).tolist(), strict=True):
        emit(buf[k])
        buf[k] = pos
    rest = np.asarray(buf)
    rng.shuffle(rest)
    return np.concatenate([np.asarray(out, np.int64), rest]).astype(np.int64, copy=False)


def _take(counts: np.ndarray, order: np.ndarray, start: int, stop: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Items [start, stop) of the shards in ``order`` laid end to end."""
    shards, members = [], []
    ends = np.cumsum(counts[order])
    begins = ends - counts[order]
    for s, b, e in zip(order, begins, ends, strict=True):
        lo, hi = max(start, b), min(stop, e)
        if lo < hi:
            shards.append(np.full(hi - lo, s, np.int32))
            members.append(np.arange(lo - b, hi - b, dtype=np.int32))
    if not shards:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(shards), np.concatenate(members)


def make_plan(counts: list[int], split: str, *, batch_size: int, rank: int, world_size: int,
              num_workers: int, epoch: int, seed: int, train: bool, start_sample: int = 0,
              shuffle_buffer: int = 0) -> EpochPlan:
    """Plan one rank's epoch from the manifest's per-shard sample counts."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    c = np.asarray(counts, np.int64)
    total = int(c.sum())
    nw = max(1, num_workers)
    if total == 0:
        raise DataError(f"split '{split}' has no samples")
    if train:
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(c))
        steps = total // (world_size * batch_size)
        if steps == 0:
            raise DataError(f"split '{split}' has {total} samples: fewer than one batch per rank "
                            f"(world_size {world_size} x batch_size {batch_size}); lower "
                            "batch_size")
        n = steps * batch_size
        shard, member = _take(c, order, rank * n, (rank + 1) * n)
        sizes = [batch_size] * steps
        real, padding = n, 0
    else:
        order = np.arange(len(c))
        base, extra = divmod(total, world_size)
        start = rank * base + min(rank, extra)
        real = base + (rank < extra)
        longest = base + (extra > 0)
        shard, member = _take(c, order, start, start + real)
        padding = longest - real
        shard = np.concatenate([shard, np.full(padding, PAD, np.int32)])
        member = np.concatenate([member, np.full(padding, PAD, np.int32)])
        steps = math.ceil(longest / batch_size)
        sizes = [batch_size] * (steps - 1) + [longest - batch_size * (steps - 1)]
    if start_sample % batch_size:
        raise DataError(f"start_sample {start_sample} is not a multiple of batch_size "
                        f"{batch_size}; resume at a batch boundary")
    return EpochPlan(split, train, seed, epoch, rank, world_size, nw, batch_size,
                     shuffle_buffer, total, steps, real, padding,
                     min(start_sample // batch_size, steps), shard, member, sizes)
