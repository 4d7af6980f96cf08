"""Image sources for sharding: each gives (stable key, encoded image bytes, label) per sample.

Sources are random access (``sample(split, i)``) so shard writers in several processes can each
take a slice. Nothing here downloads: Fashion-MNIST is read from local IDX files with
torchvision's own reader, ImageFolder trees with torchvision's class discovery.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..config.data import S3Config, SourceConfig
from ..errors import DataError
from .manifest import SourceInfo

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Sample:
    """One image: ``key`` is stable across runs; ``origin`` says where it came from (errors).

    ``image`` is the decoded image when the source has the pixels anyway (saves a decode).
    """

    key: str
    data: bytes
    label: int
    origin: str
    image: Image.Image | None = None


class Source(ABC):
    """A labelled image collection with named splits ("train", "test", maybe "val")."""

    classes: list[str]

    @abstractmethod
    def splits(self) -> dict[str, int]:
        """Split name -> number of samples."""

    @abstractmethod
    def sample(self, split: str, index: int) -> Sample: ...

    @abstractmethod
    def info(self) -> SourceInfo:
        """Kind, path and a digest that changes when the source's content does."""

    def fixed_channels(self) -> int | None:
        """Channels when the source fixes them (Fashion-MNIST: 1); None to detect from images."""
        return None

    def fingerprints(self, split: str) -> dict[str, str] | None:
        """Sample key -> a cheap fingerprint that changes when that sample does (label, size,
        mtime), in index order; None when the source cannot tell samples apart cheaply (then
        a changed source is re-sharded whole, never appended to)."""
        return None

    def __iter__(self) -> Iterator[Sample]:
        for split, n in self.splits().items():
            for i in range(n):
                yield self.sample(split, i)


_FMNIST_ARRAYS: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("VITPIPE_CACHE", Path.home() / ".cache" / "vitpipe"))


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


class FashionMNISTSource(Source):
    """Fashion-MNIST from a folder of the original IDX files (``.gz`` or uncompressed).

    torchvision's ``FashionMNIST`` reads uncompressed IDX from ``<root>/FashionMNIST/raw``; the
    files are linked (or gunzipped once, into a cache keyed by their digest) into that layout.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = {split: [self._find(n) for n in names]
                      for split, names in FMNIST_FILES.items()}
        self.digest = _sha256_files([p for ps in self.files.values() for p in ps])
        from torchvision.datasets import FashionMNIST

        self.classes = list(FashionMNIST.classes)
        self._data = _FMNIST_ARRAYS.get(self.digest) or {}
        if not self._data:
            root = self._layout()
            for split in FMNIST_FILES:
                ds = FashionMNIST(str(root), train=split == "train", download=False)
                self._data[split] = (ds.data.numpy(), ds.targets.numpy().astype(np.int64))
            _FMNIST_ARRAYS.clear()  # keep one dataset's arrays per process
            _FMNIST_ARRAYS[self.digest] = self._data

    def _find(self, name: str) -> Path:
        for cand in (self.path / name, self.path / f"{name}.gz"):
            if cand.is_file():
                return cand
        if not self.path.is_dir():
            raise DataError(f"Fashion-MNIST folder not found: {self.path} (set "
                            "shard.source.path; on Debian/Ubuntu: apt-get install "
                            "dataset-fashion-mnist)")
        raise DataError(f"Fashion-MNIST file {name}[.gz] missing in {self.path}; expected the "
                        "four original IDX files")

    def _layout(self) -> Path:
        """A root with ``FashionMNIST/raw/<uncompressed IDX>`` as torchvision expects."""
        root = _cache_dir() / "fashion-mnist" / self.digest[:16]
        raw = root / "FashionMNIST" / "raw"
        if raw.is_dir():
            return root
        raw.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=raw.parent, prefix=".raw-"))
        try:
            for p in (p for ps in self.files.values() for p in ps):
                dst = tmp / p.name.removesuffix(".gz")
                if p.suffix == ".gz":
                    with gzip.open(p, "rb") as src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                else:
                    os.symlink(p.resolve(), dst)
            os.replace(tmp, raw) if not raw.exists() else shutil.rmtree(tmp)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not raw.is_dir():
                raise
        return root

    def splits(self) -> dict[str, int]:
        return {s: len(y) for s, (_, y) in self._data.items()}

    def fixed_channels(self) -> int:
        return 1

    def sample(self, split: str, index: int) -> Sample:
        x, y = self._data[split]
        img = Image.fromarray(x[index], mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=6)
        img.format = "PNG"
        return Sample(f"{split}_{index:06d}", buf.getvalue(), int(y[index]),
                      f"{self.path} [{split} #{index}]", image=img)

    def info(self) -> SourceInfo:
        return SourceInfo(kind="fashion_mnist", path=str(self.path), digest=self.digest,
                          counts=self.splits())


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def image_extensions() -> tuple[str, ...]:
    """Every file extension PIL can open."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN))


class ImageFolderSource(Source):
    """``root/<class>/<image>`` trees (train, optional val/test), classes sorted as torchvision.

    Keys are ``<class>/<file name with unsafe characters replaced>`` so they are stable and
    contain no dots (WebDataset splits keys from extensions at the first dot).
    """

    def __init__(self, path: str | Path, val_path: str | None = None,
                 test_path: str | None = None):
        from torchvision.datasets.folder import find_classes

        self.path = Path(path)
        self.roots = {"train": self.path}
        if val_path:
            self.roots["val"] = Path(val_path)
        if test_path:
            self.roots["test"] = Path(test_path)
        for root in self.roots.values():
            if not root.is_dir():
                raise DataError(f"image folder not found: {root}")
        try:
            self.classes, self.class_to_idx = find_classes(str(self.path))
        except FileNotFoundError:
            raise DataError(f"no class folders in {self.path}: expected root/<class>/<image> "
                            "(ImageFolder layout)") from None
        self._items = {split: self._scan(split, root) for split, root in self.roots.items()}

    def _scan(self, split: str, root: Path) -> list[tuple[str, int]]:
        from torchvision.datasets.folder import make_dataset

        exts = image_extensions()
        extra = sorted(d.name for d in os.scandir(root) if d.is_dir()
                       and d.name not in self.class_to_idx)
        if extra:
            raise DataError(f"{root} has class folders not in {self.path}: {', '.join(extra)}; "
                            "every split must use the train split's classes")
        present = {c: i for c, i in self.class_to_idx.items() if (root / c).is_dir()}
        try:
            items = make_dataset(str(root), present, extensions=exts)
        except FileNotFoundError as err:
            raise DataError(f"no images found under {root}: {err} (looked for "
                            f"{', '.join(exts[:6])}, ... files in root/<class>/)") from None
        keys = {}
        for p, _ in items:
            k = self._key(Path(p), root)
            if k in keys:
                raise DataError(f"{p} and {keys[k]} map to the same sample key '{k}'; rename one")
            keys[k] = p
        return items

    @staticmethod
    def _key(p: Path, root: Path) -> str:
        rel = p.relative_to(root)
        return "/".join(_KEY_UNSAFE.sub("_", part) for part in rel.parts)

    def splits(self) -> dict[str, int]:
        return {s: len(v) for s, v in self._items.items()}

    def fingerprints(self, split: str) -> dict[str, str]:
        root = self.roots[split]
        out = {}
        for p, label in self._items[split]:
            st = os.stat(p)
            out[self._key(Path(p), root)] = f"{label}:{st.st_size}:{st.st_mtime_ns}"
        return out

    def sample(self, split: str, index: int) -> Sample:
        p, label = self._items[split][index]
        root = self.roots[split]
        try:
            data = Path(p).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image {p}: {err.strerror}") from None
        return Sample(self._key(Path(p), root), data, int(label), str(p))

    def info(self) -> SourceInfo:
        """Digest over (relative path, size, mtime) of every image: cheap, changes on edits."""
        if getattr(self, "_info", None) is None:
            self._info = self._compute_info()
        return self._info

    def _compute_info(self) -> SourceInfo:
        h = hashlib.sha256()
        for split, items in self._items.items():
            root = self.roots[split]
            for p, label in items:
                st = os.stat(p)
                h.update(f"{split}\t{Path(p).relative_to(root)}\t{label}\t{st.st_size}\t"
                         f"{st.st_mtime_ns}\n".encode())
        return SourceInfo(kind="imagefolder", path=str(self.path), digest=h.hexdigest(),
                          val_path=str(self.roots["val"]) if "val" in self.roots else None,
                          test_path=str(self.roots["test"]) if "test" in self.roots else None,
                          counts=self.splits())


class S3ImageFolderSource(Source):
    """``s3://bucket/prefix/<class>/<image>`` (train; optional val/test prefixes), listed and
    read with boto3 (:mod:`vitpipe.storage`). Classes and keys as :class:`ImageFolderSource`;
    fingerprints use each object's size and ETag, so a grown prefix appends new shards."""

    def __init__(self, path: str, val_path: str | None = None, test_path: str | None = None,
                 s3: S3Config | None = None):
        from .. import storage

        self.path, self.s3 = path.rstrip("/"), s3
        self.roots = {"train": self.path}
        if val_path:
            self.roots["val"] = val_path.rstrip("/")
        if test_path:
            self.roots["test"] = test_path.rstrip("/")
        exts = image_extensions()
        listed: dict[str, list[tuple[str, str, int, str]]] = {}
        for split, root in self.roots.items():
            rows = []
            for uri, size, etag in storage.list_objects(root, s3):
                rel = uri[len(root) + 1:]
                if "/" in rel and uri.lower().endswith(exts):
                    rows.append((uri, rel, size, etag))
            if not rows:
                raise DataError(f"no images under {root}/<class>/ (looked for "
                                f"{', '.join(exts[:6])}, ... objects)")
            listed[split] = rows
        self.classes = sorted({rel.split("/", 1)[0] for _, rel, _, _ in listed["train"]})
        index = {c: i for i, c in enumerate(self.classes)}
        self._items: dict[str, list[tuple[str, str, int, int, str]]] = {}
        for split, rows in listed.items():
            extra = sorted({rel.split("/", 1)[0] for _, rel, _, _ in rows} - set(index))
            if extra:
                raise DataError(f"{self.roots[split]} has class folders not in {self.path}: "
                                f"{', '.join(extra)}; every split must use the train split's "
                                "classes")
            items, seen = [], {}
            for uri, rel, size, etag in rows:
                key = "/".join(_KEY_UNSAFE.sub("_", part) for part in rel.split("/"))
                if key in seen:
                    raise DataError(f"{uri} and {seen[key]} map to the same sample key "
                                    f"'{key}'; rename one")
                seen[key] = uri
                items.append((uri, key, index[rel.split("/", 1)[0]], size, etag))
            self._items[split] = items

    def splits(self) -> dict[str, int]:
        return {s: len(v) for s, v in self._items.items()}

    def sample(self, split: str, index: int) -> Sample:
        from .. import storage

        uri, key, label, _, _ = self._items[split][index]
        return Sample(key, storage.read_bytes(uri, self.s3), label, uri)

    def fingerprints(self, split: str) -> dict[str, str]:
        return {key: f"{label}:{size}:{etag}" for _, key, label, size, etag in self._items[split]}

    def info(self) -> SourceInfo:
        h = hashlib.sha256()
        for split in self._items:
            for key, fp in self.fingerprints(split).items():
                h.update(f"{split}\t{key}\t{fp}\n".encode())
        return SourceInfo(kind="imagefolder", path=self.path, digest=h.hexdigest(),
                          val_path=self.roots.get("val"), test_path=self.roots.get("test"),
                          counts=self.splits())


def open_source(cfg: SourceConfig, s3: S3Config | None = None) -> Source:
    """The source a :class:`SourceConfig` describes (an ``s3://`` ImageFolder reads with
    ``s3``'s endpoint and credentials)."""
    if cfg.kind == "fashion_mnist":
        return FashionMNISTSource(cfg.path)
    if cfg.kind == "imagefolder" and cfg.path.startswith("s3://"):
        return S3ImageFolderSource(cfg.path, val_path=cfg.val_path, test_path=cfg.test_path,
                                   s3=s3)
    if cfg.kind == "imagefolder":
        return ImageFolderSource(cfg.path, val_path=cfg.val_path, test_path=cfg.test_path)
    raise DataError(f"unknown source kind {cfg.kind!r}")
