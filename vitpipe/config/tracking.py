"""MLflow tracking section, shared by every stage."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel


class TrackingConfig(StrictModel):
    """Where runs go. ``uri`` None: MLFLOW_TRACKING_URI, else the embedded SQLite store."""

    uri: str | None = None
    experiment: str = "vitpipe"
    default_uri: str = "sqlite:///mlflow.db"
    artifact_location: str | None = None  # for a new experiment; default ./mlartifacts
    connect_timeout: float = Field(10.0, gt=0)
    run_name: str | None = None
    tags: dict[str, str] = {}  # extra tags on a training run (the pipeline sets its inputs digest)
