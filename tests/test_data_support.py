"""Helpers shared by the data tests (small real shard sets, image trees, tar surgery), plus
tests of the manifest/plan basics they rely on."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitpipe.config import ShardConfig
from vitpipe.data import read_manifest, shard
from vitpipe.data.manifest import dataset_digest, split_digest
from vitpipe.data.plan import make_plan
from vitpipe.errors import DataError

FMNIST = "/usr/share/datasets/fashion-mnist"
_cache: dict[tuple, str] = {}


def fmnist_cfg(out: str | Path, limit: int = 600, per_shard: int = 130, **kw) -> ShardConfig:
    data = {"source": {"kind": "fashion_mnist", "path": FMNIST, "limit_per_split": limit},
            "output": str(out), "max_samples_per_shard": per_shard, "workers": 2, **kw}
    return ShardConfig.model_validate(data)


def small_fmnist(tmp_path_factory: pytest.TempPathFactory, limit: int = 600,
                 per_shard: int = 130) -> str:
    """A real Fashion-MNIST subset, sharded once per session per (limit, per_shard)."""
    key = (limit, per_shard)
    if key not in _cache:
        out = tmp_path_factory.mktemp(f"fmnist_{limit}_{per_shard}")
        _cache[key] = shard(fmnist_cfg(out, limit, per_shard))
    return _cache[key]


def make_imagefolder(root: Path, classes: dict[str, int], size=(20, 16), mode="RGB",
                     fmt="PNG", seed: int = 0) -> Path:
    """root/<class>/<i>.<ext> with random images (``classes``: name -> image count)."""
    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(root / c / f"img{i:03d}.{ext}", format=fmt)
    return root


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a shard's members through ``edit(list[(TarInfo, bytes)]) -> list``."""
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    members = edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in members:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def flip_member_byte(manifest: str, name: str, ext: str, n: int = 1, at: int = 0) -> list[str]:
    """Change one byte of the ``ext`` member of the first ``n`` samples in place (same size:
    the tar stays valid); a label digit becomes another valid label. Returns their keys."""
    p = Path(manifest).parent / name
    data = bytearray(p.read_bytes())
    keys = []
    with tarfile.open(p) as tf:
        for ti in tf.getmembers():
            if ti.name.endswith("." + ext) and len(keys) < n:
                keys.append(ti.name.rsplit(".", 1)[0])
                i = ti.offset_data + min(at, ti.size - 1)
                data[i] = ord("0") + (data[i] - ord("0") + 1) % 10 if ext == "cls" else \
                    data[i] ^ 0x01
    p.write_bytes(bytes(data))
    return keys


def refresh_manifest(manifest_uri: str) -> None:
    """Make a test-modified shard consistent with the manifest again (size + hashes)."""
    import hashlib

    p = Path(manifest_uri)
    m = json.loads(p.read_text())
    for sp in m["splits"].values():
        for s in sp["shards"]:
            data = (p.parent / s["name"]).read_bytes()
            s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    p.write_text(json.dumps(m))


def copy_shards(src_manifest: str, dst: Path) -> str:
    import shutil

    shutil.copytree(Path(src_manifest).parent, dst)
    return str(dst / "manifest.json")


# ------------------------------------------------------------------------------------ tests


def test_small_shards_manifest_matches_files(tmp_path_factory):
    uri = small_fmnist(tmp_path_factory)
    m = read_manifest(uri)
    assert {k: v.count for k, v in m.splits.items()} == {"train": 500, "val": 100, "test": 600}
    assert [s.count for s in m.splits["train"].shards] == [130, 130, 130, 110]
    import hashlib

    for name, sp in m.splits.items():
        assert sp.digest == split_digest(sp.shards)
        assert sum(sp.class_counts) == sp.count
        for s, url in zip(sp.shards, m.shard_urls(name), strict=True):
            data = Path(url).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (s.bytes, s.sha256)
            with tarfile.open(url) as tf:
                names = tf.getnames()
            assert len(names) == 3 * s.count
            assert all(n.endswith((".png", ".cls", ".crc")) for n in names)
    assert m.digest == dataset_digest(m.splits)
    assert m.channels == 1 and m.image_size == (28, 28) and m.image_format == "png"
    assert 0.25 < m.mean[0] < 0.32 and 0.32 < m.std[0] < 0.38  # Fashion-MNIST: 0.286, 0.353


def test_plan_equal_steps_and_disjoint_ranks():
    counts = [130, 130, 130, 110]
    plans = [make_plan(counts, "train", batch_size=16, rank=r, world_size=2, num_workers=2,
                       epoch=3, seed=1, train=True, shuffle_buffer=50) for r in range(2)]
    assert {p.steps for p in plans} == {500 // 32}
    items = [set(zip(p.shard.tolist(), p.member.tolist(), strict=True)) for p in plans]
    assert len(items[0]) == len(items[1]) == 15 * 16 and not items[0] & items[1]
    with pytest.raises(DataError, match="fewer than one batch"):
        make_plan([3], "train", batch_size=4, rank=0, world_size=1, num_workers=0, epoch=0,
                  seed=0, train=True)
    with pytest.raises(DataError, match="multiple of batch_size"):
        make_plan(counts, "train", batch_size=16, rank=0, world_size=1, num_workers=0, epoch=0,
                  seed=0, train=True, start_sample=5)


def test_buffer_shuffle_order_is_a_bounded_lag_permutation():
    from vitpipe.data.plan import buffer_shuffle_order

    order = buffer_shuffle_order(1000, 64, [1, 2])
    assert sorted(order.tolist()) == list(range(1000))
    assert all(pos <= t + 64 for t, pos in enumerate(order.tolist()))  # streamable
    assert order.tolist() != list(range(1000))
    assert order.tolist() == buffer_shuffle_order(1000, 64, [1, 2]).tolist()
    assert order.tolist() != buffer_shuffle_order(1000, 64, [1, 3]).tolist()
    assert buffer_shuffle_order(10, 1, [0]).tolist() == list(range(10))


@pytest.mark.parametrize(("mode", "fmt", "channels"), [("L", "PNG", 1), ("RGB", "JPEG", 3),
                                                       ("RGB", "BMP", 3)])
def test_decode_tensor_plain_and_tv_tensor_agree_with_pil(mode, fmt, channels):
    import torch
    from torchvision import tv_tensors

    from vitpipe.data import images

    arr = np.random.default_rng(0).integers(0, 256, (9, 7, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(buf, format=fmt)
    data, ext = buf.getvalue(), fmt.lower().replace("jpeg", "jpg")
    img = images.decode_tensor(data, ext, channels, "k")
    plain = images.decode_tensor(data, ext, channels, "k", plain=True)
    assert isinstance(img, tv_tensors.Image) and type(plain) is torch.Tensor
    assert plain.dtype == torch.uint8 and plain.shape == (channels, 9, 7)
    assert torch.equal(plain, img.as_subclass(torch.Tensor))
    ref = np.asarray(Image.open(io.BytesIO(data)).convert(mode))  # PIL's decode of the bytes
    ref = ref[None] if channels == 1 else ref.transpose(2, 0, 1)
    assert np.abs(plain.numpy().astype(int) - ref).max() <= (0 if fmt != "JPEG" else 2)
