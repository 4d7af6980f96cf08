"""Data loading speed: vitpipe shard loader vs torchvision ImageFolder vs in-memory decode.

The same images (written once as files, and once into shards with their bytes unchanged), the
same transform (vitpipe's eval transform) and 2 worker processes for all:

* ``wds``: ``vitpipe.data.make_loader`` over the shards (one shuffled epoch): torchvision's
  decoders straight to uint8 tensors; the transform's channel conversion, resize/crop, ToDtype
  and Normalize once per stacked batch (identical numbers, see ``split_batchable``).
* ``imagefolder``: ``torchvision.datasets.ImageFolder(transform=...)`` (PIL decode) +
  ``DataLoader(shuffle=True)``, as usually written.
* ``imagefolder_tuned``: ImageFolder with the shard loader's decoder and per-batch tail, so it
  differs from ``wds`` only in reading one file per image.
* ``wds_nocrc``: ``wds`` without the per-sample ``.crc`` check (``verify_sample_crc=False``);
  ``crc_cost`` (and ``crc_cost_cpu``) is ``1 - wds / wds_nocrc``: what integrity by default
  costs.
* ``decode``: the ceiling: the encoded bytes already in memory, the same decoder and split
  transform, stacked (straight into shared memory, as the shard loader does), in 2 workers.
* ``tar_parse_*`` / ``resume_skip_*``: splitting the shards into samples without decoding, one
  process, ``vitpipe.data.tario.TarCursor`` vs webdataset's ``tarfile`` path; and reaching
  each shard's last sample as a mid-epoch resume does (why ``tario`` exists).

img/s is wall clock (best of ``--reps`` interleaved passes); ``*_img_per_cpu_s`` divides by the
CPU seconds the loader's processes used, which is steadier on a shared machine.
Datasets: Fashion-MNIST train images (PNG, 28x28 gray) and generated 224x224 colour JPEGs.
The last line printed is JSON; its headline keys are Fashion-MNIST's, ``color_*`` the colour
set's. Run: ``nice python bench/data_speed.py`` (``--quick`` for a small smoke run).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitpipe.config import AugmentConfig, ShardConfig  # noqa: E402
from vitpipe.data import images, make_loader, read_manifest, shard  # noqa: E402
from vitpipe.data.sources import FashionMNISTSource  # noqa: E402
from vitpipe.data.transforms import (  # noqa: E402
    build_eval_transform,
    split_batchable,
    transform_batch,
)

WORKERS = 2


def write_fmnist_tree(root: Path, n: int, src: str) -> None:
    """The first ``n`` Fashion-MNIST train images as root/<class>/<key>.png."""
    s = FashionMNISTSource(src)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        smp = s.sample("train", i)
        (root / f"c{smp.label}" / f"{smp.key}.png").write_bytes(smp.data)


def _color_jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((224, 224), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (224, 224, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_color(args: tuple[Path, int]) -> None:
    root, i = args
    (root / f"c{i % 10}" / f"img{i:06d}.jpg").write_bytes(_color_jpeg(i))


def write_color_tree(root: Path, n: int) -> None:
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    with mp.get_context("fork").Pool(WORKERS) as pool:
        pool.map(_write_color, [(root, i) for i in range(n)], chunksize=256)


class _InMemory(torch.utils.data.IterableDataset):
    """The decode ceiling: bytes in memory -> decode -> transform head -> stack -> tail."""

    def __init__(self, blobs: list[bytes], labels: list[int], tf, batch: int, channels: int):
        super().__init__()
        self.blobs, self.labels, self.batch, self.channels = blobs, labels, batch, channels
        self.head, self.tail = split_batchable(tf)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        n_batches = len(self.blobs) // self.batch
        for b in range(w, n_batches, nw):
            sl = range(b * self.batch, (b + 1) * self.batch)
            x = transform_batch(self.head, self.tail,
                                [_decode(self.blobs[i], self.channels, self.head is None)
                                 for i in sl],
                                shared=info is not None)
            yield x, torch.tensor([self.labels[i] for i in sl])


def _decode(data: bytes, channels: int, plain: bool = False):
    ext = "png" if data[:4] == b"\x89PNG" else "jpg"
    return images.decode_tensor(data, ext, channels, "bench", plain=plain)


class _TensorFile:
    """ImageFolder loader: the file's bytes through the shard loader's decoder."""

    def __init__(self, channels: int, plain: bool):
        self.channels, self.plain = channels, plain

    def __call__(self, path: str):
        return _decode(Path(path).read_bytes(), self.channels, self.plain)


class _BatchTail:
    """collate_fn: stack the per-sample head outputs, then run the transform's tail once."""

    def __init__(self, tail):
        self.tail = tail

    def __call__(self, items):
        x = transform_batch(None, self.tail, [t for t, _ in items],
                            shared=torch.utils.data.get_worker_info() is not None)
        return x, torch.tensor([y for _, y in items])


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _time(loader) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process + its finished workers), images."""
    c0, t0 = _cpu(), time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    dt = time.perf_counter() - t0
    del loader
    return dt, _cpu() - c0, n


def tar_parse(m, reps: int) -> dict[str, float]:
    """Why ``vitpipe.data.tario`` exists, measured: samples/s splitting the train shards into
    samples without decoding, one process, ``TarCursor`` vs webdataset's own ``tarfile`` path
    (``tar_file_iterator`` + ``group_by_keys``); and ``resume_skip``: reaching each shard's
    last sample, as a mid-epoch resume does (``TarCursor`` skips without copying, ``tarfile``
    must read every member)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from vitpipe.data.tario import TarCursor

    shards = m.split("train").shards
    urls = m.shard_urls("train")
    n = sum(s.count for s in shards)

    def ours(last_only: bool) -> None:
        for url, s in zip(urls, shards, strict=True):
            cur = TarCursor(url)
            got = cur.read_many(s.count - 1, 1) if last_only else cur.read_many(0, s.count)
            assert got, url
            cur.close()

    def theirs(last_only: bool) -> None:
        for url, s in zip(urls, shards, strict=True):
            with open(url, "rb") as f:
                members = ({**x, "__url__": url} for x in tar_file_iterator(f))
                k = sum(1 for _ in group_by_keys(members))
            assert k == s.count, (url, k, s.count)

    best: dict[str, float] = {}
    for _ in range(max(reps, 3)):
        for key, fn, last in (("tario", ours, False), ("tarfile", theirs, False),
                              ("tario_skip", ours, True), ("tarfile_skip", theirs, True)):
            t0 = time.perf_counter()
            fn(last)
            best[key] = max(best.get(key, 0.0), n / (time.perf_counter() - t0))
    return {"tar_parse_tario_samples_s": round(best["tario"]),
            "tar_parse_tarfile_samples_s": round(best["tarfile"]),
            "tar_parse_tario_over_tarfile": round(best["tario"] / best["tarfile"], 2),
            "tar_parse_tarfile_us_per_sample": round(1e6 / best["tarfile"], 1),
            "resume_skip_tario_over_tarfile": round(best["tario_skip"] / best["tarfile_skip"], 2)}


def bench_set(name: str, tree: Path, out: Path, batch: int, reps: int,
              only: set[str] | None = None) -> dict[str, float]:
    from torchvision.datasets import ImageFolder

    t0 = time.perf_counter()
    cfg = ShardConfig.model_validate({"source": {"kind": "imagefolder", "path": str(tree)},
                                      "output": str(out), "image_format": "keep",
                                      "val_fraction": 0, "workers": WORKERS,
                                      "max_samples_per_shard": 2000})
    m = read_manifest(shard(cfg))
    shard_s = time.perf_counter() - t0
    size = m.image_size[0] if m.image_size else 224
    tf = build_eval_transform(AugmentConfig(), m, size)

    head, tail = split_batchable(tf)
    folder = ImageFolder(str(tree), transform=tf, loader=Image.open)
    folder_tuned = ImageFolder(str(tree), transform=head,
                               loader=_TensorFile(m.channels, head is None))
    blobs = [Path(p).read_bytes() for p, _ in folder.samples]
    labels = [y for _, y in folder.samples]
    perm = np.random.default_rng(0).permutation(len(blobs))
    blobs, labels = [blobs[i] for i in perm], [labels[i] for i in perm]

    def dl(ds, **kw):
        return torch.utils.data.DataLoader(ds, num_workers=WORKERS, **kw)

    loaders = {
        "wds": lambda: make_loader(m.uri, "train", batch, num_workers=WORKERS, transform=tf),
        "wds_nocrc": lambda: make_loader(m.uri, "train", batch, num_workers=WORKERS, transform=tf,
                                         verify_sample_crc=False),
        "imagefolder": lambda: dl(folder, batch_size=batch, shuffle=True, drop_last=True),
        "imagefolder_tuned": lambda: dl(folder_tuned, batch_size=batch, shuffle=True,
                                        drop_last=True, collate_fn=_BatchTail(tail)),
        "decode": lambda: dl(_InMemory(blobs, labels, tf, batch, m.channels), batch_size=None),
    }
    if only:
        loaders = {k: v for k, v in loaders.items() if k in only}
    best = dict.fromkeys(loaders, 0.0)
    per_cpu = dict.fromkeys(loaders, 0.0)
    for rep in range(reps):  # interleaved (order alternating), best of reps: a shared machine
        for key, make in (list(loaders.items()) if rep % 2 == 0 else
                          list(loaders.items())[::-1]):
            dt, cpu, n = _time(make())
            best[key] = max(best[key], n / dt)
            per_cpu[key] = max(per_cpu[key], n / cpu)
    res = {"images": len(blobs), "shard_s": round(shard_s, 1), **tar_parse(m, reps),
           **{f"{k}_img_s": round(v, 1) for k, v in best.items()},
           **{f"{k}_img_per_cpu_s": round(v, 1) for k, v in per_cpu.items()}}
    if "wds" in best and "wds_nocrc" in best:
        res["crc_cost"] = round(1 - best["wds"] / best["wds_nocrc"], 4)
        res["crc_cost_cpu"] = round(1 - per_cpu["wds"] / per_cpu["wds_nocrc"], 4)
    for base in ("imagefolder", "imagefolder_tuned", "decode"):
        if base not in best or "wds" not in best:
            continue
        tag = "decode_ceiling" if base == "decode" else base
        res[f"wds_over_{tag}"] = round(best["wds"] / best[base], 3)
        res[f"wds_over_{tag}_cpu"] = round(per_cpu["wds"] / per_cpu[base], 3)
    print(f"{name}: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmnist-count", type=int, default=60_000)
    ap.add_argument("--color-count", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="2000 images per set, 1 repetition")
    ap.add_argument("--reps", type=int, default=1, help="best of N interleaved passes")
    ap.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--work-dir", help="keep files here (default: a temp dir, removed)")
    ap.add_argument("--only", choices=["fmnist", "color"], help="one set (JSON: its keys only)")
    ap.add_argument("--loaders", help="comma-separated subset of wds,wds_nocrc,imagefolder,"
                    "imagefolder_tuned,decode (default: all); e.g. wds,wds_nocrc for crc_cost")
    args = ap.parse_args()
    if args.quick:
        args.fmnist_count, args.color_count, args.reps = 2000, 2000, 1
    only = set(args.loaders.split(",")) if args.loaders else None
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vitpipe-bench-"))
    try:
        t0 = time.perf_counter()
        marker = work / f".trees-{args.fmnist_count}-{args.color_count}"
        if not marker.exists():  # --work-dir: a second run reuses the files (and shards)
            write_fmnist_tree(work / "fmnist", args.fmnist_count, args.fmnist_dir)
            write_color_tree(work / "color", args.color_count)
            marker.touch()
        print(f"wrote {args.fmnist_count} + {args.color_count} image files in "
              f"{time.perf_counter() - t0:.1f}s under {work}", flush=True)
        fm = co = None
        if args.only != "color":
            fm = bench_set("fashion_mnist", work / "fmnist", work / "fmnist_shards", 256,
                           args.reps, only)
        if args.only != "fmnist":
            co = bench_set("color_224_jpeg", work / "color", work / "color_shards", 64,
                           args.reps, only)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    out: dict[str, float | int | None] = {}
    for prefix, res in (("", fm), ("color_", co)):
        if res is not None:
            out.update({f"{prefix}{k}": v for k, v in res.items()
                        if k.endswith(("_img_s", "_cpu_s"))
                        or k.startswith(("wds_over", "crc_cost", "tar_parse", "resume_skip"))})
            out[f"{prefix or 'fmnist_'}images"] = res["images"]
    out.update(workers=WORKERS, cpus=os.cpu_count())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
