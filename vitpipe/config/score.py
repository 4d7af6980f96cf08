"""Batch scoring config: which model scores which images, and where the predictions go."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel
from .data import S3Config
from .tracking import TrackingConfig


class ScoreConfig(StrictModel):
    """``model`` scores ``input`` in batches; predictions go to ``output`` as Parquet.

    ``input``: a folder of images (recursive), an ``s3://`` prefix of images, or a shard set's
    manifest (``.../manifest.json``; ``split`` chooses which of its splits).
    """

    model: str = "models:/vitpipe-fmnist@champion"  # any pyfunc URI vitpipe registered
    input: str
    output: str  # a .parquet path or s3:// URI
    split: str = "test"  # for a shard-set input
    batch_size: int = Field(256, gt=0)
    top_k: int = Field(5, ge=1)
    # decode processes; None: on CPU none up to 2 cores and one above (decoding is ~10% of
    # a CPU forward, and a process beside it takes cores from the forward's threads: on 2
    # cores in-process decoding was the faster, bench/score_speed.py), beside a GPU
    # cores - 1 up to 8 (a GPU forward waits for decoding)
    num_workers: int | None = Field(None, ge=0)
    progress: bool = True
    s3: S3Config = S3Config()
    tracking: TrackingConfig = TrackingConfig()
