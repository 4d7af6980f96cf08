"""MLflow connection for the registry: resolve the URI, fail fast when it is unreachable, and
turn MLflow's exceptions into :class:`TrackingError` messages that name the thing missing."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..config import TrackingConfig
from ..errors import TrackingError

# Without these, an MLflow client retries a dead server with exponential backoff for minutes.
# (And no per-file download progress bars in pipeline logs.)
_BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def resolve_uri(tracking: TrackingConfig | None = None) -> str:
    """``tracking.uri``, else MLFLOW_TRACKING_URI, else the embedded SQLite default."""
    tracking = tracking or TrackingConfig()
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri


def check_reachable(uri: str, timeout: float) -> None:
    """For an HTTP tracking URI, GET ``/health`` within ``timeout`` seconds or raise."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status < 400:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({problem}, checked {url} with a "
        f"{timeout:g}s timeout). Start it (vitpipe stack up) or point tracking.uri / "
        "MLFLOW_TRACKING_URI at a running server.")


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries (unless the user set them) so failures surface in seconds."""
    for key, value in _BOUNDED_HTTP.items():
        os.environ.setdefault(key, value)


def connect(tracking: TrackingConfig | None = None) -> tuple[MlflowClient, str]:
    """A client for tracking and registry on the same URI, after a bounded reachability check."""
    tracking = tracking or TrackingConfig()
    uri = resolve_uri(tracking)
    check_reachable(uri, tracking.connect_timeout)
    bound_http_retries()
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def is_not_found(err: MlflowException) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def is_already_exists(err: MlflowException) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


@contextlib.contextmanager
def tracking_errors(what: str, uri: str) -> Iterator[None]:
    """Re-raise MLflow failures inside the block as TrackingError naming ``what`` and ``uri``."""
    try:
        yield
    except MlflowException as err:
        reason = "does not exist" if is_not_found(err) else f"failed: {err.message}"
        raise TrackingError(f"{what} {reason} (tracking URI {uri})") from err
