"""MLflow tracking for every stage: only the main process logs, everything else is a no-op.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite
store (``sqlite:///mlflow.db``, artifacts in ``./mlartifacts``; no server). Reachability is
checked up front with a bounded timeout so a wrong URI fails before any expensive work.
The explicit :class:`mlflow.MlflowClient` is used throughout (no fluent global run), so one
process can log into a run it did not start (evaluation logs into the training run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import TrackingConfig
from .errors import TrackingError

_CRED_RE = re.compile(r"(://)([^/@:]+)(:[^/@]*)?@")
_PARAM_MAX = 6000  # MLflow's param value limit


def redact_uri(uri: str) -> str:
    """``scheme://user:pass@host`` -> ``scheme://***@host`` (for messages and tags)."""
    return _CRED_RE.sub(r"\1***@", uri)


def resolve_uri(cfg: TrackingConfig) -> str:
    """Config ``uri``, else ``MLFLOW_TRACKING_URI``, else ``cfg.default_uri``."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.default_uri


def model_version(uri: str, registry_uri: str) -> Any:
    """The ``ModelVersion`` behind ``models:/<name>/<version>`` (``latest`` included) or
    ``models:/<name>@<alias>``, looked up in the registry at ``registry_uri``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/"):].strip("/")
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = ref.split("/", 1)
    if version == "latest":
        newest = client.search_model_versions(f"name = '{name}'", max_results=1,
                                              order_by=["version_number DESC"])
        if not newest:
            raise MlflowException(f"registered model {name!r} has no versions")
        return newest[0]
    return client.get_model_version(name, version)


def check_reachable(uri: str, timeout: float) -> None:
    """Raise :class:`TrackingError` naming ``uri`` if the store cannot be reached in ``timeout``."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                if resp.status >= 500:
                    raise TrackingError(f"MLflow server {shown} answered HTTP {resp.status}")
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise TrackingError(f"MLflow server {shown} answered HTTP {err.code}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {shown} is unreachable within {timeout:g}s ({reason}); "
                "start it, or set tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(str(path), timeout=timeout).close()
        except (OSError, sqlite3.Error) as err:
            raise TrackingError(f"cannot open MLflow SQLite store {shown}: {err}") from None
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create MLflow file store {shown}: {err}") from None


def _s3_endpoint() -> str:
    ep = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return redact_uri(ep) if ep else "the default AWS endpoint"


def artifact_failure(err: BaseException) -> str | None:
    """Why an artifact-store call failed, in one line; None if ``err`` is not a store failure.

    MLflow's S3 artifact repository lets botocore's own exceptions through (and boto3 wraps
    upload failures in ``S3UploadFailedError``): every S3 path of vitpipe names endpoint and
    bucket in one line, so the artifact store does the same."""
    try:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
    except ImportError:  # no boto3: only a local or proxied store
        return f"{type(err).__name__}: {err}" if isinstance(err, OSError) else None
    ep = _s3_endpoint()
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
        return (f"S3 endpoint {ep} unreachable; check MLFLOW_S3_ENDPOINT_URL and that the "
                "server is running")
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return (f"no AWS credentials for S3 endpoint {ep}; set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    text = str(err)
    if isinstance(err, (ClientError, S3UploadFailedError)):
        code = (str(err.response.get("Error", {}).get("Code", ""))
                if isinstance(err, ClientError) else
                (re.search(r"\((\w+)\)", text) or [None, "unknown"])[1])
        if code == "NoSuchBucket":
            return f"bucket does not exist at S3 endpoint {ep}; create it or fix the location"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return f"access denied ({code}) at S3 endpoint {ep}; check the AWS credentials"
        return f"S3 error {code} at endpoint {ep}"
    if isinstance(err, BotoCoreError):
        return f"S3 endpoint {ep}: {type(err).__name__}"
    if isinstance(err, OSError):  # a local store: disk full, permissions
        return f"{type(err).__name__}: {err}"
    return None


@contextlib.contextmanager
def artifact_errors(what: str, location: str | None = None,
                    kept: str | Path | None = None) -> Iterator[None]:
    """Re-raise an artifact-store failure in the block as one :class:`TrackingError` line that
    names ``what``, the store ``location`` and, for uploads, where the local copy still is."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:
        from mlflow.exceptions import MlflowException

        reason = artifact_failure(err)
        if (reason is None and isinstance(err, MlflowException)  # a proxied store, server side
                and err.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")):
            reason = f"the tracking server failed: {err.message.splitlines()[0][:300]}"
        if reason is None:
            raise
        where = f" at {redact_uri(location)}" if location else ""
        keep = f"; the local copy is kept at {kept}" if kept else ""
        raise TrackingError(f"cannot {what} in the MLflow artifact store{where}: {reason}{keep}"
                            ) from None


def default_artifact_location(uri: str, cfg: TrackingConfig) -> str | None:
    """Artifacts of a new experiment: the config's, or ``mlartifacts`` beside a SQLite file."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str:
    """The repository's HEAD commit, ``VITPIPE_GIT_COMMIT``, or ``unknown`` (never fails)."""
    if os.environ.get("VITPIPE_GIT_COMMIT"):
        return os.environ["VITPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(mode: str, world_size: int) -> dict[str, str]:
    """Standard tags: git commit, mode, world size, Prefect flow run id when present."""
    tags = {
        "vitpipe.git_commit": git_commit(),
        "vitpipe.mode": mode,
        "vitpipe.world_size": str(world_size),
    }
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID")
    if flow_run:
        tags["vitpipe.prefect_flow_run_id"] = flow_run
    return tags


def manifest_dataset(manifest: Any, manifest_uri: str, split: str):
    """An MLflow dataset describing ``split`` of a shard manifest, built without reading data.

    Digest: the split's digest if the manifest has one, else the manifest's digest.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class ManifestDataset(MetaDataset):
        """Shard-manifest metadata (source, digest, split, counts) as an MLflow dataset."""

        def __init__(self, source, name, digest, profile):
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return super().to_dict() | {"profile": json.dumps(self._profile)}

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(manifest_uri)
    except Exception:  # noqa: BLE001 - any unresolvable URI still gets a source
        source = HTTPDatasetSource(url=manifest_uri)
    sp = manifest.splits[split]
    src = getattr(manifest, "source", None)
    src_path = str(getattr(src, "path", src) or "")
    profile = {
        "split": split,
        "num_samples": int(sp.count),
        "num_shards": len(sp.shards),
        "num_classes": len(manifest.classes),
        "image_size": json.dumps(getattr(manifest, "image_size", None)),
        "source_kind": str(getattr(src, "kind", "")),
        "source_path": src_path,
        "source_digest": str(getattr(src, "digest", "")),
        "manifest_digest": str(manifest.digest),
        "split_digest": split_digest(manifest, split),
    }
    name = f"{Path(src_path).name or 'shards'}-{split}"
    # MLflow caps dataset digests at 36 characters; the full one is in the profile
    return ManifestDataset(source, name, split_digest(manifest, split)[:36], profile)


def split_digest(manifest: Any, split: str) -> str:
    """The split's digest when the manifest records one, else the whole manifest's digest."""
    sp = manifest.splits[split]
    return str(getattr(sp, "digest", None) or manifest.digest)


class Tracker:
    """MLflow logging bound to one run; every method is a no-op when ``active`` is False."""

    def __init__(self, cfg: TrackingConfig, active: bool = True) -> None:
        self.cfg = cfg
        self.active = active
        self.uri = resolve_uri(cfg)
        self.run_id: str | None = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def check(self) -> None:
        """Bounded reachability check (main process only)."""
        if self.active:
            check_reachable(self.uri, self.cfg.connect_timeout)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                self.cfg.experiment,
                artifact_location=default_artifact_location(self.uri, self.cfg),
            )
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> str | None:
        """Open ``run_id`` (resume/evaluate) or create a new run; returns the run id."""
        if not self.active:
            return None
        try:
            if run_id:
                run = self.client.get_run(run_id)
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            else:
                run = self.client.create_run(
                    self._experiment_id(), run_name=run_name or self.cfg.run_name, tags=tags
                )
                self.run_id = run.info.run_id
        except TrackingError:
            raise
        except Exception as err:
            what = f"run {run_id}" if run_id else f"experiment '{self.cfg.experiment}'"
            raise TrackingError(
                f"MLflow at {redact_uri(self.uri)}: cannot open {what}: {err}"
            ) from None
        if tags and run_id:
            self.set_tags(tags)
        return self.run_id

    def attach(self, run_id: str) -> str:
        """Log into an existing run without changing its status (evaluation, registry)."""
        if not self.active:
            return run_id
        try:
            self.client.get_run(run_id)
        except Exception as err:
            raise TrackingError(
                f"MLflow run {run_id} not found at {redact_uri(self.uri)}: {err}"
            ) from None
        self.run_id = run_id
        return run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self.run_id:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_params(self, params: dict[str, str]) -> None:
        """Log params in batches (values truncated to MLflow's limit); skips ones already set."""
        if not (self.active and self.run_id):
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not (self.active and self.run_id) or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact_uri(self) -> str | None:
        try:
            return self.client.get_run(self.run_id).info.artifact_uri
        except Exception:  # only for messages
            return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and self.run_id:
            with artifact_errors(f"upload {Path(path).name}", self.artifact_uri(), kept=path):
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Write ``data`` as JSON under ``artifact_file`` (e.g. ``config/train_config.json``)."""
        if not (self.active and self.run_id):
            return
        sub, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(data, indent=2, default=str))
            with artifact_errors(f"upload {artifact_file}", self.artifact_uri()):
                self.client.log_artifact(self.run_id, str(p), sub or None)

    def log_dataset(self, manifest: Any, manifest_uri: str, split: str, context: str) -> None:
        """``log_inputs`` of a :func:`manifest_dataset` with an ``mlflow.data.context`` tag."""
        if not (self.active and self.run_id):
            return
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        ds = manifest_dataset(manifest, manifest_uri, split)
        entity = DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def metric_history(self, key: str, run_id: str | None = None) -> list[tuple[int, float]]:
        run = run_id or self.run_id
        if not run:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(run, key)]

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
