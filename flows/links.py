"""MLflow links for Prefect artifacts: run pages, model versions, artifact images.

Links are best effort: a file-based or SQLite tracking store has no web UI, so those get the
``mlflow ui`` command instead of a URL. Nothing here talks to a server except
:func:`experiment_id`, which asks MLflow once per run and tolerates failure.
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import quote

from vitpipe.config import TrackingConfig


def tracking_uri(tracking: TrackingConfig) -> str:
    """The URI a stage actually uses: config, else MLFLOW_TRACKING_URI, else the default."""
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri


def ui_base(tracking: TrackingConfig) -> str | None:
    """The MLflow web UI base URL, or None when the store is local (no UI running)."""
    uri = tracking_uri(tracking)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def experiment_id(tracking: TrackingConfig, run_id: str) -> str | None:
    with contextlib.suppress(Exception):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri(tracking)).get_run(run_id).info.experiment_id
    return None


def run_link(tracking: TrackingConfig, run_id: str | None) -> str:
    """Markdown for a run: a UI link when there is a UI, else the id."""
    if not run_id:
        return "-"
    base = ui_base(tracking)
    if base is None:
        return f"`{run_id}`"
    exp = experiment_id(tracking, run_id) or "0"
    return f"[{run_id}]({base}/#/experiments/{exp}/runs/{run_id})"


def artifact_url(tracking: TrackingConfig, run_id: str, path: str) -> str | None:
    """A URL that serves one run artifact (the MLflow server's get-artifact endpoint)."""
    base = ui_base(tracking)
    if base is None:
        return None
    return f"{base}/get-artifact?path={quote(path)}&run_uuid={run_id}"


def model_version_link(tracking: TrackingConfig, name: str, version: str | int | None) -> str:
    if version is None:
        return f"`{name}`"
    base = ui_base(tracking)
    text = f"{name} v{version}"
    if base is None:
        return f"`{text}`"
    return f"[{text}]({base}/#/models/{quote(name)}/versions/{version})"


def run_charts_link(tracking: TrackingConfig, run_id: str | None) -> str:
    """Markdown link to a run's metric charts (the training curves), or how to see them."""
    base = ui_base(tracking)
    if not run_id:
        return "-"
    if base is None:
        return f"`mlflow ui --backend-store-uri {tracking_uri(tracking)}`, run `{run_id}`"
    exp = experiment_id(tracking, run_id) or "0"
    return f"[metric charts]({base}/#/experiments/{exp}/runs/{run_id}/model-metrics)"
