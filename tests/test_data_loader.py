"""make_loader on real shards with real worker processes and simulated ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.test_data_support import small_fmnist
from vitpipe.config import AugmentConfig
from vitpipe.data import images, make_loader, read_manifest, steps_per_epoch
from vitpipe.data.transforms import build_train_transform


def _run(uri, split, batch, rank=0, world=1, workers=2, **kw):
    loader = make_loader(uri, split, batch, rank, world, num_workers=workers, with_keys=True,
                         **kw)
    xs, ys, keys = [], [], []
    for x, y, k in loader:
        xs.append(x)
        ys.append(y)
        keys.append(list(k))
    return loader, xs, ys, keys


@pytest.mark.parametrize("per_shard", [130, 400])  # 4 uneven shards; 2 shards < 2 ranks x 2
def test_train_two_ranks_two_workers_equal_full_batches(tmp_path_factory, per_shard):
    uri = small_fmnist(tmp_path_factory, per_shard=per_shard)
    m = read_manifest(uri)
    assert len({s.count for s in m.splits["train"].shards}) > 1  # uneven
    runs = [_run(uri, "train", 16, rank=r, world=2, workers=2, epoch=1, seed=7)
            for r in range(2)]
    expected = m.splits["train"].count // 32
    assert steps_per_epoch(uri, "train", 16, world_size=2) == expected
    seen = []
    for loader, xs, ys, keys in runs:
        assert len(loader) == len(xs) == expected
        assert all(x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 for x in xs)
        assert all(y.dtype == torch.long and (y >= 0).all() for y in ys)
        flat = [k for b in keys for k in b]
        assert len(set(flat)) == len(flat) == expected * 16
        assert all(k.startswith("train_") for k in flat)
        seen.append(set(flat))
    assert not seen[0] & seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_order_is_reproducible_and_resume_yields_the_exact_tail(tmp_path_factory, workers):
    uri = small_fmnist(tmp_path_factory)
    m = read_manifest(uri)
    aug = AugmentConfig(scale_min=0.3, hflip=0.5, auto_augment="trivialaugment",
                        random_erasing=0.5)
    tf = build_train_transform(aug, m, 28)
    common = dict(world=1, workers=workers, epoch=2, seed=3, transform=tf, shuffle_buffer=64)
    full, xs, ys, keys = _run(uri, "train", 16, **common)
    again = _run(uri, "train", 16, **common)
    assert keys == again[3] and all(torch.equal(a, b) for a, b in zip(xs, again[1], strict=True))
    k = 5
    resumed, rxs, rys, rkeys = _run(uri, "train", 16, start_sample=k * 16, **common)
    assert len(resumed) == len(full) - k
    assert rkeys == keys[k:]
    assert all(torch.equal(a, b) for a, b in zip(rxs, xs[k:], strict=True))  # same augmentation
    other = _run(uri, "train", 16, **{**common, "epoch": 3})[3]
    assert other != keys
    assert [k for b in keys for k in b] != sorted(k for b in keys for k in b)  # shuffled


def test_inline_loading_leaves_the_callers_rng_alone(tmp_path_factory):
    """Augmentation reseeds per batch: inline (no workers) that must not touch the training
    process's RNG (dropout, drop-path draw from it)."""
    uri = small_fmnist(tmp_path_factory)
    tf = build_train_transform(AugmentConfig(hflip=0.5, random_erasing=0.5),
                               read_manifest(uri), 28)
    it = iter(make_loader(uri, "train", 16, num_workers=0, transform=tf))
    next(it)  # (the DataLoader draws its base seed from the global RNG here)
    state = torch.get_rng_state()
    for _ in range(3):
        next(it)
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_does_not_decode_skipped_samples(tmp_path_factory, monkeypatch):
    uri = small_fmnist(tmp_path_factory)
    calls = Counter()
    real = images.decode_tensor

    def counting(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(images, "decode_tensor", counting)
    loader = make_loader(uri, "train", 20, num_workers=0, epoch=0, start_sample=20 * 20)
    batches = list(loader)
    assert len(batches) == len(loader) == 500 // 20 - 20
    assert calls["n"] == len(batches) * 20  # only the remaining samples were decoded


@pytest.mark.parametrize(("split", "world", "batch"), [("val", 3, 16), ("test", 2, 64)])
def test_eval_sees_every_sample_exactly_once_with_padding(tmp_path_factory, split, world,
                                                          batch):
    uri = small_fmnist(tmp_path_factory)
    count = read_manifest(uri).splits[split].count
    runs = [_run(uri, split, batch, rank=r, world=world, workers=2, train=False)
            for r in range(world)]
    assert len({len(r[1]) for r in runs}) == 1  # equal batch counts on every rank
    assert len({tuple(x.shape[0] for x in r[1]) for r in runs}) == 1  # and equal sizes
    keys = [k for r in runs for b in r[3] for k in b if k]
    labels = torch.cat([y for r in runs for y in r[2]])
    assert len(keys) == len(set(keys)) == count == int((labels >= 0).sum())
    assert int((labels < 0).sum()) == world * -(-count // world) - count
    assert sum(r[0].samples for r in runs) == count


def test_pil_and_tensor_decoding_give_the_same_batches(tmp_path_factory):
    uri = small_fmnist(tmp_path_factory)
    a = _run(uri, "val", 32, workers=0, train=False)
    b = _run(uri, "val", 32, workers=0, train=False, decode="pil")
    assert a[3] == b[3] and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
    with pytest.raises(Exception, match="decode must be"):
        make_loader(uri, "val", 32, decode="cv2")


@pytest.mark.parametrize("left", [1, 2, 3])
def test_resume_near_the_end_of_an_epoch(tmp_path_factory, left):
    uri = small_fmnist(tmp_path_factory)
    full = _run(uri, "train", 16, workers=2, epoch=4, seed=5)
    steps = len(full[0])
    tail = _run(uri, "train", 16, workers=2, epoch=4, seed=5, start_sample=(steps - left) * 16)
    assert len(tail[0]) == left and tail[3] == full[3][-left:]
    assert len(_run(uri, "train", 16, workers=2, epoch=4, start_sample=steps * 16)[1]) == 0


def test_read_runs_stay_in_one_shard_in_member_order_and_bounded():
    from vitpipe.data.loader import _READ_RUN, _read_runs
    from vitpipe.data.plan import PAD

    rng = np.random.default_rng(0)
    shard = np.repeat([3, 1, PAD, 1, 0], [150, 40, 3, 10, 70])
    member = np.concatenate([np.arange(150), np.arange(40), [0, 0, 0], np.arange(50, 60),
                             rng.permutation(70)])
    needed = rng.random(len(shard)) > 0.05
    needed[:150] = True
    end = _read_runs(shard, member, needed)
    pos = 0
    while pos < len(shard):
        e = int(end[pos])
        assert pos < e <= pos + _READ_RUN
        run = slice(pos, e)
        if e - pos > 1:
            assert len(set(shard[run].tolist())) == 1 and PAD not in shard[run]
            assert (np.diff(member[run]) == 1).all() and needed[run].all()
        pos = e
    assert end[[0, _READ_RUN, 2 * _READ_RUN]].tolist() == [_READ_RUN, 2 * _READ_RUN, 150]


def test_reading_settings_come_from_the_config_and_unknown_ones_are_refused(tmp_path_factory):
    from vitpipe.config import DataConfig

    uri = small_fmnist(tmp_path_factory)
    cfg = DataConfig(num_workers=0, shuffle_buffer=0, prefetch_factor=3)
    a = make_loader(uri, "train", 16, data=cfg)
    assert a.plan.num_workers == 1 and a.plan.shuffle_buffer == 0  # 0 workers: one, in-process
    b = make_loader(uri, "train", 16, data=cfg, num_workers=2)  # a call's override wins
    assert b.plan.num_workers == 2 and b.plan.shuffle_buffer == 0
    assert len(list(b)) == len(b)
    with pytest.raises(TypeError, match="shuffle_bufer"):
        make_loader(uri, "train", 16, shuffle_bufer=10)
    with pytest.raises(ValueError, match="num_workers"):  # validated like the config
        make_loader(uri, "train", 16, num_workers=-1)
