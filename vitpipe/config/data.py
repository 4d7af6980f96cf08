"""Data sections: where shards come from (shard stage) and how they are read (loader)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel


class S3Config(StrictModel):
    """S3 access. Credentials come from the standard AWS environment/profile, never from here."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL or boto3's default
    region: str | None = None
    max_retry_seconds: float = Field(30.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)


class SourceConfig(StrictModel):
    """What to shard: Fashion-MNIST IDX files or an ImageFolder tree (a local path, or
    ``s3://bucket/prefix`` holding ``<class>/<image>`` objects)."""

    kind: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    path: str = "/usr/share/datasets/fashion-mnist"
    # ImageFolder only: optional separate test/val trees (root/<class>/<image>)
    test_path: str | None = None
    val_path: str | None = None
    limit_per_split: int | None = Field(None, gt=0)  # small subsets for tests and smoke runs


class ShardConfig(StrictModel):
    """The shard stage: source -> WebDataset tars + manifest.json under ``output``."""

    source: SourceConfig = SourceConfig()
    output: str = "shards/fashion_mnist"  # local path, file:// or s3://bucket/prefix
    val_fraction: float = Field(1 / 6, ge=0, lt=1)  # carved from train when no val split
    seed: int = 0
    # png: lossless (default); jpeg: re-encoded at jpeg_quality; keep: the source's own bytes
    # (re-encoded as PNG only when an image must change mode to the dataset's channels)
    image_format: Literal["png", "jpeg", "keep"] = "png"
    channels: Literal[1, 3] | None = None  # None: Fashion-MNIST 1; ImageFolder from 1st image
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_samples_per_shard: int = Field(10_000, gt=0)
    max_bytes_per_shard: int = Field(256 * 2**20, gt=0)
    workers: int = Field(2, ge=1)
    overwrite: bool = False
    # a source that changed under the same settings: "version" makes a new dataset version
    # (new images appended as new shards, else a full re-shard), "refuse" stops with an error
    on_source_change: Literal["version", "refuse"] = "version"
    grow_test: bool = False  # new test images join the test split (else it is a fixed holdout)
    s3: S3Config = S3Config()


class AugmentConfig(StrictModel):
    """Train-time augmentation (torchvision.transforms.v2); eval is resize + crop + normalize."""

    img_size: int | None = Field(None, gt=0)  # None: the model's img_size
    random_resized_crop: bool = True
    scale_min: float = Field(0.35, gt=0, le=1)
    ratio_min: float = Field(3 / 4, gt=0)
    ratio_max: float = Field(4 / 3, gt=0)
    random_crop_padding: int = Field(0, ge=0)  # without RRC: pad, then crop back (translate)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.0, ge=0)  # colour images only
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    random_erasing: float = Field(0.0, ge=0, le=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    eval_crop_pct: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _ratio(self) -> AugmentConfig:
        if self.ratio_min > self.ratio_max:
            raise ValueError("augment.ratio_min must be <= augment.ratio_max")
        return self


class DataConfig(StrictModel):
    """How a training/eval stage reads shards."""

    manifest: str | None = None  # set by the pipeline from the shard stage's output
    batch_size: int = Field(128, gt=0)  # per process, per step (before accumulation)
    eval_batch_size: int = Field(256, gt=0)
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(2, ge=1)  # batches each loader worker keeps ready
    shuffle_buffer: int = Field(2000, ge=0)
    max_bad_fraction: float = Field(0.001, ge=0, le=1)
    verify_sha256: bool = False  # hash every shard before reading (slow on big data)
    # check each sample's .crc member (CRC-32 of its label + image, written by `vitpipe shard`):
    # a mismatch is a counted skip (max_bad_fraction); shards without .crc are read unchecked
    verify_sample_crc: bool = True
    augment: AugmentConfig = AugmentConfig()
    s3: S3Config = S3Config()
