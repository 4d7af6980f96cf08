"""Shared helpers for the train/evaluate/distributed tests (no tests here).

Shards are real Fashion-MNIST subsets made by ``vitpipe.data.shard``; models are the real
``vitpipe.models`` variants shrunk to depth 2 / width 32 so steps take milliseconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from vitpipe.config import ShardConfig, SourceConfig, TrainConfig, load

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"

TINY = [
    "model.name=vit_tiny_patch7_28", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
    "mae.decoder_embed_dim=32", "mae.decoder_depth=1", "mae.decoder_num_heads=2",
]
NO_AUG = [
    "data.augment.random_resized_crop=false", "data.augment.hflip=0",
    "data.augment.random_erasing=0", "data.num_workers=0", "data.shuffle_buffer=64",
]


def make_shards(base: Path, limit: int, per_shard: int, val_fraction: float = 0.2) -> str:
    """Shards of ``limit`` train(+val) and ``limit`` test images; cached under ``base``."""
    from vitpipe.data import shard

    out = base / f"fmnist_{limit}_{per_shard}_{val_fraction}"
    return shard(ShardConfig(source=SourceConfig(path=FMNIST, limit_per_split=limit),
                             output=str(out), val_fraction=val_fraction,
                             max_samples_per_shard=per_shard, workers=1))


def train_overrides(tmp: Path, manifest: str, *extra: str) -> list[str]:
    return [
        f"data.manifest={manifest}", f"output_dir={tmp}/out", f"checkpoint.dir={tmp}/ckpt",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.experiment=test", "progress=false",
        "train.num_threads=1", *TINY, *NO_AUG, *extra,
    ]


def train_cfg(tmp: Path, manifest: str, *extra: str) -> TrainConfig:
    return load(TrainConfig, None, train_overrides(tmp, manifest, *extra))


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    e.update(extra)
    return e


def cli(args: list[str], timeout: float = 240, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m vitpipe.cli ...`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "vitpipe.cli", *args], cwd=REPO,
                          env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def accelerate_cmd(*launch_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", *launch_args,
            "-m", "vitpipe.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
