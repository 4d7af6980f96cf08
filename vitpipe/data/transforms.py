"""Train/eval image transforms (torchvision.transforms.v2) and MixUp/CutMix batch transforms.

Both transforms take a PIL image (any mode L/RGB/RGBA/P...) or a uint8 tensor, bring it to the
manifest's channel count first, and end with normalisation by the manifest's train mean/std, so
the registry's pyfunc can feed raw user images through ``build_eval_transform`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..config.data import AugmentConfig
from ..errors import DataError
from .manifest import Manifest


class ToChannels(torch.nn.Module):
    """PIL image or (C, H, W) tensor -> ``tv_tensors.Image`` with ``channels`` channels."""

    def __init__(self, channels: int):
        super().__init__()
        if channels not in (1, 3):
            raise DataError(f"manifest channels must be 1 or 3, got {channels}")
        self.channels = channels

    def forward(self, img: Any) -> torch.Tensor:
        if isinstance(img, Image.Image):
            mode = "L" if self.channels == 1 else "RGB"
            if img.mode != mode:
                img = img.convert(mode)
            t = torch.from_numpy(np.array(img))  # faster than to_image for small images
            t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
            return t.as_subclass(tv_tensors.Image)
        t = v2.functional.to_image(img) if not isinstance(img, torch.Tensor) else img
        if t.ndim == 2:
            t = t.unsqueeze(0)
        c = t.shape[-3]
        if c == self.channels:
            return t
        if c == 4:
            t, c = t[..., :3, :, :], 3
        if self.channels == 1 and c == 3:
            return v2.functional.rgb_to_grayscale(t)
        if self.channels == 3 and c == 1:
            return t.expand(*t.shape[:-3], 3, *t.shape[-2:]).clone()
        raise DataError(f"cannot convert a {c}-channel image to {self.channels} channels")


class ResizeCenterCrop(torch.nn.Module):
    """Resize the shorter side to ``resize`` then center-crop ``size``; a no-op (skipped, not
    recomputed) when the image already is ``size`` x ``size`` and ``resize == size``."""

    def __init__(self, size: int, resize: int):
        super().__init__()
        self.size, self.resize = size, resize

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.resize == self.size and tuple(img.shape[-2:]) == (self.size, self.size):
            return img
        img = v2.functional.resize(img, [self.resize], antialias=True)
        return v2.functional.center_crop(img, [self.size, self.size])


def _size(aug: AugmentConfig, manifest: Manifest, img_size: int | None) -> int:
    size = img_size or aug.img_size or (manifest.image_size[0] if manifest.image_size else None)
    if not size:
        raise DataError("image size unknown: images in the manifest vary in size; set "
                        "augment.img_size or pass img_size (the model's)")
    return int(size)


def _normalize(manifest: Manifest) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(manifest.mean, manifest.std)]


def build_train_transform(aug: AugmentConfig, manifest: Manifest,
                          img_size: int | None = None) -> v2.Compose:
    """Crop/flip/jitter/auto-augment on uint8, then normalise, then random erasing."""
    size = _size(aug, manifest, img_size)
    ops: list[Callable] = [ToChannels(manifest.channels)]
    if aug.random_resized_crop:
        ops.append(v2.RandomResizedCrop(size, scale=(aug.scale_min, 1.0),
                                        ratio=(aug.ratio_min, aug.ratio_max), antialias=True))
    else:
        ops.append(ResizeCenterCrop(size, size))
        if aug.random_crop_padding:  # small images: random translation by up to the padding
            ops.append(v2.RandomCrop(size, padding=aug.random_crop_padding))
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.color_jitter > 0 and manifest.channels == 3:
        cj = aug.color_jitter
        ops.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    if aug.auto_augment == "randaugment":
        ops.append(v2.RandAugment(magnitude=aug.randaugment_magnitude))
    elif aug.auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    ops += _normalize(manifest)
    if aug.random_erasing > 0:
        ops.append(v2.RandomErasing(p=aug.random_erasing, value=0))
    return v2.Compose(ops)


def build_eval_transform(aug: AugmentConfig, manifest: Manifest,
                         img_size: int | None = None) -> v2.Compose:
    """Resize (shorter side to size / crop_pct), center crop, normalise. PIL in, tensor out."""
    size = _size(aug, manifest, img_size)
    resize = int(round(size / aug.eval_crop_pct))
    return v2.Compose([ToChannels(manifest.channels), ResizeCenterCrop(size, resize),
                       *_normalize(manifest)])


class BatchMix:
    """Apply MixUp or CutMix to a batch with probability ``prob``; targets always come back
    as (B, num_classes) probabilities.

    Use with ``F.cross_entropy(logits, targets, label_smoothing=ls)``: PyTorch smooths
    probability targets too, so label smoothing composes with mixing.
    """

    def __init__(self, mix: Callable, num_classes: int, prob: float):
        self.mix, self.num_classes, self.prob = mix, num_classes, prob

    def __call__(self, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob >= 1 or torch.rand(()) < self.prob:
            return self.mix(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)


def build_mix(aug: AugmentConfig, num_classes: int) -> BatchMix | None:
    """MixUp/CutMix batch transform from the config, or None when both alphas are 0."""
    choices = []
    if aug.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    if not choices or aug.mix_prob == 0:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
    return BatchMix(mix, num_classes, aug.mix_prob)


class BatchHorizontalFlip(torch.nn.Module):
    """``RandomHorizontalFlip`` for a stacked (B, C, H, W) batch: each image flipped
    independently with probability ``p`` (a single (C, H, W) image: as v2's)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 4:
            return v2.RandomHorizontalFlip(self.p)(x)
        flip = torch.rand(x.shape[0]) < self.p
        if not bool(flip.any()):
            return x
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class ScaleNormalize(torch.nn.Module):
    """``ToDtype(float32, scale=True)`` then ``Normalize(mean, std)`` in one pass over the
    float data (``x * 1/(255 std) - mean/std``): on 224px batches the separate ops cost more
    than the resize. ``out``: write there (a slice of the final batch) instead of allocating."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.mean, self.std = list(mean), list(std)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(-1, 1, 1)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.as_subclass(torch.Tensor)
        scale, shift = self.scale.to(x.device), self.shift.to(x.device)
        if x.is_floating_point():  # already in [0, 1]: ToDtype would not rescale it
            scale = scale * 255.0
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        # the copy converts dtype and layout: a channels-last uint8 batch (as decoded) lands in
        # a contiguous ``out``, so scale and shift run along whole planes; broadcast over a
        # channels-last batch's innermost dim of 3 they took 2-3x as long as the copy
        return out.copy_(x).mul_(scale).add_(shift).as_subclass(tv_tensors.Image)


def _merge_scale_normalize(tail: list[Callable]) -> list[Callable]:
    """Replace ``ToDtype(float32, scale=True), Normalize`` on uint8 input by one op."""
    out: list[Callable] = []
    for op in tail:
        prev = out[-1] if out else None
        if (isinstance(op, v2.Normalize) and isinstance(prev, v2.ToDtype) and prev.scale
                and prev.dtype in (torch.float32, {tv_tensors.Image: torch.float32})
                and not op.inplace):
            out[-1] = ScaleNormalize(op.mean, op.std)
        else:
            out.append(op)
    return out


def _batch_op(op: Callable) -> Callable | None:
    """The batch form of a per-sample op whose effect on each image is independent of the other
    images (and that works on (B, C, H, W) as on (C, H, W)); None if it has none."""
    if isinstance(op, (v2.ToDtype, v2.Normalize, ToChannels, ResizeCenterCrop,
                       BatchHorizontalFlip)):
        return op
    if isinstance(op, v2.RandomHorizontalFlip):
        return BatchHorizontalFlip(op.p)
    return None


def split_batchable(transform: Callable) -> tuple[Callable | None, Callable | None]:
    """Split a ``v2.Compose`` into a per-sample head (None if empty) and a per-batch tail: the
    longest suffix of ops with a batch form (channel conversion, resize + center crop at a fixed
    size, horizontal flip, ToDtype, Normalize).

    Running the tail once on the stacked uint8 batch costs a fraction of running it per sample
    (the v2 dispatch alone is ~10 us per op and image). Deterministic ops give the same numbers;
    flips draw one coin per image, as per sample, from the batch's seeded generator. The tail
    also accepts a single image (for batches whose images differ in size).
    """
    if not isinstance(transform, v2.Compose):
        return transform, None
    ops = list(transform.transforms)
    tail: list[Callable] = []
    while ops and (batch := _batch_op(ops[-1])) is not None:
        ops.pop()
        tail.insert(0, batch)
    if not tail:
        return transform, None
    return (v2.Compose(ops) if ops else None), v2.Compose(_merge_scale_normalize(tail))


def apply_batch_tail(tail: Callable | None, batch: torch.Tensor) -> torch.Tensor:
    """Run a :func:`split_batchable` tail on a stacked (B, C, H, W) batch."""
    if tail is None:
        return batch
    return tail(batch.as_subclass(tv_tensors.Image)).as_subclass(torch.Tensor)


def _stack(xs: list[torch.Tensor]) -> torch.Tensor:
    """Stack (C, H, W) images; colour images in channels-last memory (as decoded) stack as
    (B, H, W, C), viewed as a channels-last (B, C, H, W) batch: no transposing copy, and
    resizing a channels-last uint8 batch takes torchvision's vectorised path."""
    if xs[0].ndim == 3 and xs[0].shape[0] > 1 and all(
            t.permute(1, 2, 0).is_contiguous() for t in xs):
        return torch.stack([t.permute(1, 2, 0) for t in xs]).permute(0, 3, 1, 2)
    return torch.stack(xs)


CHUNK_BYTES = 1 << 17  # uint8 input per tail call: its float intermediates stay in cache


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               channels_last: bool, shared: bool) -> torch.Tensor:
    """An uninitialised batch; in shared memory if ``shared`` (what a DataLoader worker would
    otherwise copy it into; see torch's default_collate)."""
    physical = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    if shared:
        numel = 1
        for d in physical:
            numel *= d
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize, device=device)
        out = torch.empty(0, dtype=dtype, device=device).set_(storage).view(physical)
    else:
        out = torch.empty(physical, dtype=dtype, device=device)
    return out.permute(0, 3, 1, 2) if channels_last else out


def _is_channels_last(x: torch.Tensor) -> bool:
    return (x.ndim == 4 and x.shape[1] > 1 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def _uniform(xs: list[Any], tail: Callable | None) -> tuple[list[torch.Tensor], Any]:
    """Plain same-shape tensors from head outputs: ragged or PIL images go through the tail one
    by one (which resizes/converts them; the tail is then done). Else a DataError."""
    if tail is not None and not all(isinstance(t, torch.Tensor) and t.shape == xs[0].shape
                                    for t in xs):
        xs = [tail(t) for t in xs]  # ragged or PIL: the tail resizes/converts each image
        tail = None
    if not all(isinstance(t, torch.Tensor) for t in xs):
        raise DataError("the transform must turn each image into a tensor (end with ToImage/"
                        "ToDtype, or use vitpipe.data.transforms)")
    xs = [t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor) for t in xs]
    if len({tuple(t.shape) for t in xs}) > 1:
        shapes = sorted({tuple(t.shape) for t in xs})
        raise DataError(f"images in one batch differ in shape {shapes[:3]}; pass a transform "
                        "that resizes (vitpipe.data.transforms)")
    return xs, tail


def transform_batch(head: Callable | None, tail: Callable | None, images: list[Any], *,
                    shared: bool = False) -> torch.Tensor:
    """``images`` through a :func:`split_batchable` pair into one (B, C, H, W) batch: the head
    per image, then the tail on stacked chunks of about ``CHUNK_BYTES`` (all at once for small
    images; a few at a time for large ones, whose float copies would otherwise stream through
    memory once per op), or per image where sizes differ. A final :class:`ScaleNormalize`
    writes each chunk straight into the batch (no float intermediate to copy). ``shared``:
    build the batch in shared memory (inside DataLoader workers)."""
    xs = [head(img) for img in images] if head is not None else list(images)
    if not (all(type(t) is torch.Tensor for t in xs) and len({t.shape for t in xs}) == 1):
        xs, tail = _uniform(xs, tail)  # the common case (same-size plain tensors) skips this
    ops = list(tail.transforms) if isinstance(tail, v2.Compose) else [tail] if tail else []
    norm = ops.pop() if ops and isinstance(ops[-1], ScaleNormalize) else None
    pre = v2.Compose(ops) if ops else None
    if pre is None and norm is None and not shared:
        return _stack(xs)
    step = max(1, CHUNK_BYTES // max(xs[0].nbytes, 1))
    out = None
    for i in range(0, len(xs), step):
        part = apply_batch_tail(pre, _stack(xs[i:i + step]))
        if out is None:
            out = _new_batch((len(xs), *part.shape[1:]), torch.float32 if norm else part.dtype,
                             part.device, norm is None and _is_channels_last(part), shared)
        dst = out[i:i + part.shape[0]]
        if norm is not None:
            norm(part, out=dst)
        else:
            dst.copy_(part)
    assert out is not None
    return out


__all__ = ["BatchHorizontalFlip", "BatchMix", "ResizeCenterCrop", "ScaleNormalize", "ToChannels",
           "apply_batch_tail", "build_eval_transform", "build_mix", "build_train_transform",
           "split_batchable", "transform_batch"]
