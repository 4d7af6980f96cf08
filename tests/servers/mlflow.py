"""MLflow fixtures: a real ``mlflow server`` (SQLite backend, artifacts in a SeaweedFS S3 bucket)
and an embedded SQLite tracking store, both in temp dirs; servers are stopped afterwards.

The server is started by :func:`vitpipe.stack.mlflow_server.start_mlflow_server`, the same code
``vitpipe stack`` uses. S3 credentials reach only the server process (proxied artifacts), so the
tests' clients talk plain HTTP to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vitpipe.stack.mlflow_server import MlflowServer, start_mlflow_server


@dataclass
class LocalStore:
    """The embedded store: no server, a SQLite file and an artifact directory."""

    uri: str
    artifact_location: str


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 with artifacts in bucket ``mlflow`` of the S3 fixture."""
    s3_server.make_bucket("mlflow")
    s3_env = {
        **{k: v for k, v in s3_server.env().items() if k.startswith(("AWS_", "MLFLOW_S3"))},
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    s3_env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"),
                                 artifacts_destination="s3://mlflow/artifacts", s3_env=s3_env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 with artifacts on local disk (no S3 needed)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server-local"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def mlflow_sqlite(tmp_path: Path) -> LocalStore:
    """A fresh embedded store (``sqlite:///.../mlflow.db``), as ``make run`` uses by default."""
    return LocalStore(uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      artifact_location=str(tmp_path / "mlartifacts"))
