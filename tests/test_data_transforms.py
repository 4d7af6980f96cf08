"""Train/eval transforms and MixUp/CutMix against a manifest's channels and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitpipe.config import AugmentConfig
from vitpipe.data.manifest import Manifest, SourceInfo
from vitpipe.data.transforms import (
    BatchHorizontalFlip,
    ScaleNormalize,
    build_eval_transform,
    build_mix,
    build_train_transform,
    split_batchable,
    transform_batch,
)


def _manifest(channels: int, size=(28, 28)) -> Manifest:
    return Manifest(source=SourceInfo(kind="test", path="-", digest="0"), config={},
                    config_digest="0", classes=[str(i) for i in range(10)], channels=channels,
                    image_size=size, image_format="png", mean=[0.25] * channels,
                    std=[0.5] * channels, splits={}, digest="0", created_at="now")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_eval_transform_converts_mode_and_normalises(channels, mode):
    m = _manifest(channels)
    img = Image.new(mode, (40, 30), 200 if mode in ("L", "P") else (200, 200, 200))
    x = build_eval_transform(AugmentConfig(eval_crop_pct=0.875), m, 28)(img)
    assert x.shape == (channels, 28, 28) and x.dtype == torch.float32
    if mode != "P":  # P with index 200 maps to another grey; skip exact value
        assert torch.allclose(x, torch.full_like(x, (200 / 255 - 0.25) / 0.5), atol=1e-5)


def test_train_transform_applies_every_configured_op():
    m = _manifest(3, (32, 32))
    aug = AugmentConfig(scale_min=0.2, hflip=1.0, color_jitter=0.4, auto_augment="randaugment",
                        random_erasing=1.0)
    tf = build_train_transform(aug, m, 24)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["ToChannels", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter",
                     "RandAugment", "ToDtype", "Normalize", "RandomErasing"]
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    a = tf(Image.fromarray(arr))
    torch.manual_seed(0)
    b = tf(Image.fromarray(arr))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)  # seeded -> reproducible
    gray = build_train_transform(aug, _manifest(1), 28)
    assert "ColorJitter" not in [type(t).__name__ for t in gray.transforms]  # colour only
    assert gray(Image.new("L", (28, 28))).shape == (1, 28, 28)
    trivial = build_train_transform(AugmentConfig(auto_augment="trivialaugment"), _manifest(1))
    assert trivial(Image.new("L", (28, 28))).shape == (1, 28, 28)


def test_mix_targets_work_with_label_smoothing():
    assert build_mix(AugmentConfig(), 10) is None
    mix = build_mix(AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0), 10)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    mx, my = mix(x, y)
    assert mx.shape == x.shape and my.shape == (8, 10)
    assert torch.allclose(my.sum(1), torch.ones(8)) and not torch.equal(mx, x)
    loss = F.cross_entropy(torch.randn(8, 10), my, label_smoothing=0.1)
    assert torch.isfinite(loss)
    never = build_mix(AugmentConfig(mixup_alpha=0.8, mix_prob=1e-9), 10)
    nx, ny = never(x, y)
    assert torch.equal(nx, x) and torch.equal(ny.argmax(1), y)  # one-hot when not mixed


@pytest.mark.parametrize("size", [28, 20])
def test_batched_tail_gives_identical_numbers(size):
    m = _manifest(3)
    tf = build_eval_transform(AugmentConfig(), m, size)
    head, tail = split_batchable(tf)
    assert head is None  # eval: channel conversion, resize+crop, ToDtype, Normalize all batch
    assert [type(t).__name__ for t in tail.transforms] == [
        "ToChannels", "ResizeCenterCrop", "ScaleNormalize"]
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(4)]
    imgs = [Image.fromarray(a) for a in arrays]
    per_sample = torch.stack([tf(i) for i in imgs])
    tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    batched = transform_batch(head, tail, tensors)  # stacked once, tail on the batch
    assert type(batched) is torch.Tensor and torch.allclose(per_sample, batched, atol=1e-6)
    assert torch.allclose(transform_batch(head, tail, imgs), per_sample, atol=1e-6)  # PIL
    ragged = [*tensors[:2], torch.from_numpy(
        rng.integers(0, 256, (3, 40, 36), dtype=np.uint8))]  # sizes differ: per image
    out = transform_batch(head, tail, ragged)
    assert out.shape == (3, 3, size, size) and torch.allclose(out[:2], per_sample[:2], atol=1e-6)
    erasing = build_train_transform(AugmentConfig(random_erasing=0.5), m, size)
    assert split_batchable(erasing)[1] is None  # random tail: stays per sample


def test_batch_flip_flips_each_image_independently():
    m = _manifest(1)
    tf = build_train_transform(AugmentConfig(random_resized_crop=False, hflip=0.5), m, 28)
    head, tail = split_batchable(tf)
    assert head is None and any(isinstance(t, BatchHorizontalFlip) for t in tail.transforms)
    img = torch.arange(28 * 28, dtype=torch.uint8).reshape(1, 28, 28)  # asymmetric
    torch.manual_seed(0)
    out = transform_batch(head, tail, [img] * 64)
    plain = transform_batch(None, tail_without_flip(tail), [img])[0]
    flipped = [bool(torch.allclose(o, plain.flip(-1))) for o in out]
    kept = [bool(torch.allclose(o, plain)) for o in out]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each: one or the other
    assert 16 < sum(flipped) < 48  # about half, drawn per image
    torch.manual_seed(0)
    assert torch.equal(transform_batch(head, tail, [img] * 64), out)  # seeded: reproducible


@pytest.mark.parametrize("channels", [1, 3])
def test_scale_normalize_equals_todtype_then_normalize(channels):
    from torchvision.transforms import v2

    mean, std = [0.2, 0.4, 0.6][:channels], [0.3, 0.2, 0.1][:channels]
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    fused = ScaleNormalize(mean, std)
    x = torch.randint(0, 256, (5, channels, 9, 7), dtype=torch.uint8)
    cl = x.contiguous(memory_format=torch.channels_last)
    for inp in (x, cl, x[0]):
        assert torch.allclose(fused(inp), ref(inp), atol=1e-5)
    assert fused(cl).is_contiguous()  # planes, whatever the input's layout
    dst = torch.zeros(7, channels, 9, 7)
    fused(cl, out=dst[1:6])  # straight into a slice of a batch
    assert torch.allclose(dst[1:6], ref(x), atol=1e-5) and not dst[0].any() and not dst[6].any()
    f = x.float() / 255  # float input: not rescaled again, as ToDtype
    assert torch.allclose(fused(f), ref(f), atol=1e-5) and torch.equal(f, x.float() / 255)


def tail_without_flip(tail):
    from torchvision.transforms import v2

    return v2.Compose([t for t in tail.transforms if not isinstance(t, BatchHorizontalFlip)])


@pytest.mark.parametrize("shared", [False, True])
def test_chunked_and_shared_batches_equal_the_plain_batch(monkeypatch, shared):
    from vitpipe.data import transforms as T

    m = _manifest(3)
    head, tail = split_batchable(build_eval_transform(AugmentConfig(), m, 20))
    hwc = torch.randint(0, 256, (10, 28, 28, 3), dtype=torch.uint8)
    imgs = list(hwc.permute(0, 3, 1, 2))  # channels-last views, as decoded
    whole = transform_batch(head, tail, imgs)
    monkeypatch.setattr(T, "CHUNK_BYTES", 3 * 28 * 28 * 3)  # 3 images per tail call
    chunked = transform_batch(head, tail, imgs, shared=shared)
    assert chunked.shape == (10, 3, 20, 20) and torch.allclose(chunked, whole, atol=1e-6)
    assert chunked.is_contiguous() and whole.is_contiguous()
    assert chunked.is_shared() == shared
    assert transform_batch(head, tail, imgs[:2], shared=shared).is_shared() == shared


def test_random_crop_padding_translates_small_images():
    m = _manifest(1)
    tf = build_train_transform(AugmentConfig(random_resized_crop=False, hflip=0.0,
                                             random_crop_padding=3), m, 28)
    head, tail = split_batchable(tf)
    assert head is not None  # the random crop runs per image; flips/normalise stay batched
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 10:18, 10:18] = 255  # a bright square: find where each output put it
    torch.manual_seed(0)
    out = transform_batch(head, tail, [img] * 32)
    assert out.shape == (32, 1, 28, 28)
    shifts = set()
    for o in out:
        ys, xs = torch.nonzero(o[0] > o.min() + 1e-3, as_tuple=True)
        assert (int(ys.max() - ys.min()), int(xs.max() - xs.min())) == (7, 7)  # moved, whole
        shifts.add((int(ys.min()) - 10, int(xs.min()) - 10))
    assert len(shifts) > 5 and all(abs(dy) <= 3 and abs(dx) <= 3 for dy, dx in shifts)
