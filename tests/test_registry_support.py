"""Helpers for the registry tests (no tests here): real Fashion-MNIST test images, a real shard
manifest, and "training runs" logged exactly as the training-stage contract says
(``config/train_config.json``, ``manifest/manifest.json``, ``weights/model.safetensors``, eval
metrics, ``vitpipe.eval_digest``) for a tiny vitpipe ViT.

The reference prediction (:func:`direct_topk`) decodes the raw IDX bytes and normalises them with
plain tensor arithmetic, independently of the pyfunc's PNG decode and eval transform, so any
preprocessing bug in the served path shows up as a mismatch.
"""

from __future__ import annotations

import gzip
import io
import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from PIL import Image

from vitpipe.config import ModelConfig, TrainConfig
from vitpipe.models import build_from_config

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ModelConfig(name="vit_tiny_patch4_28", embed_dim=32, depth=1, num_heads=2)


@cache
def fmnist_test(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` real Fashion-MNIST test images (uint8, (n, 28, 28)) and labels."""
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n].copy()
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].copy()
    return images, labels


def png_bytes(img: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    (pil.convert(mode) if mode else pil).save(buf, format="PNG")
    return buf.getvalue()


def write_pngs(dst: Path, n: int) -> list[Path]:
    images, _ = fmnist_test(n)
    dst.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = dst / f"fmnist_test_{i:03d}.png"
        p.write_bytes(png_bytes(img))
        paths.append(p)
    return paths


def make_manifest(dst: Path) -> Path:
    """A real shard manifest of a small Fashion-MNIST subset (the shard stage's own output)."""
    from vitpipe.config import ShardConfig, SourceConfig
    from vitpipe.data import shard

    cfg = ShardConfig(source=SourceConfig(kind="fashion_mnist", path=str(FMNIST),
                                          limit_per_split=64),
                      output=str(dst / "shards"), workers=1)
    uri = shard(cfg)
    return Path(uri.removeprefix("file://"))


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_from_config(TINY).eval()


def log_training_run(uri: str, manifest_path: Path, tmp: Path, *, seed: int,
                     top1: float | None, eval_digest: str | None, experiment: str = "registry",
                     with_weights: bool = True) -> tuple[str, torch.nn.Module]:
    """Log a run as ``vitpipe train`` + ``vitpipe evaluate`` would; return (run_id, model)."""
    from vitpipe.data import read_manifest
    from vitpipe.weights import save_safetensors

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=None if uri.startswith("http") else str(tmp / "mlartifacts"))
    run = client.create_run(exp_id, tags={"vitpipe.mode": "supervised",
                                          "vitpipe.git_commit": "0" * 40})
    rid = run.info.run_id
    model = tiny_model(seed)
    work = tmp / rid
    (work / "config").mkdir(parents=True)
    cfg = TrainConfig(model=TINY, output_dir=str(work))
    (work / "config" / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    client.log_artifact(rid, str(work / "config" / "train_config.json"), "config")
    client.log_artifact(rid, str(manifest_path), "manifest")
    if with_weights:
        (work / "weights").mkdir()
        save_safetensors(model.state_dict(), str(work / "weights" / "model.safetensors"))
        client.log_artifact(rid, str(work / "weights" / "model.safetensors"), "weights")
    manifest = read_manifest(str(manifest_path))
    client.set_tag(rid, "vitpipe.dataset_digest", str(manifest.digest))
    if eval_digest is not None:
        client.set_tag(rid, "vitpipe.eval_digest", eval_digest)
    if top1 is not None:
        client.log_metric(rid, "test_top1", top1)
        client.log_metric(rid, "test_top5", min(1.0, top1 + 0.05))
    client.set_terminated(rid)
    return rid, model


def direct_topk(model: torch.nn.Module, manifest_path: Path, images: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k: raw uint8 -> /255 -> (x - mean) / std -> forward -> softmax."""
    from vitpipe.data import read_manifest

    m = read_manifest(str(manifest_path))
    mean = torch.tensor(m.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(m.std, dtype=torch.float32).view(-1, 1, 1)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = (x - mean) / std
    with torch.inference_mode():
        p = torch.softmax(model(x), -1)
    top = torch.topk(p, k, -1)
    return top.values.numpy(), top.indices.numpy()


def eval_digest_of(manifest_path: Path) -> str:
    """The test split's digest: what ``vitpipe evaluate`` tags as ``vitpipe.eval_digest``."""
    from vitpipe.data import read_manifest

    return read_manifest(str(manifest_path)).splits["test"].digest


def classes(manifest_path: Path) -> list[str]:
    from vitpipe.data import read_manifest

    return list(read_manifest(str(manifest_path)).classes)


def dump(obj: object) -> str:
    return json.dumps(obj, default=str)
