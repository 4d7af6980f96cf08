"""Start and stop a local ``mlflow server``: SQLite backend, artifacts on disk or in S3.

The server runs in proxied-artifact mode (``--serve-artifacts``): clients upload and download
artifacts through the server, so only the server process needs S3 credentials. Those reach it
through its environment (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), never its command line, where ``ps`` would show them.

Used by ``vitpipe stack`` and by the tests' ``mlflow_server`` fixture, so both run this code.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .process import ManagedProcess, free_port

_S3_ENV_KEYS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "MLFLOW_S3_IGNORE_TLS")


@dataclass
class MlflowServer:
    """A running ``mlflow server``; ``uri`` is what clients use as MLFLOW_TRACKING_URI."""

    process: ManagedProcess
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold S3 secrets

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.uri}/health"

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mlflow_server(
    data_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    artifacts_destination: str | None = None,
    s3_env: dict[str, str] | None = None,
    workers: int = 1,
    timeout: float = 90.0,
) -> MlflowServer:
    """Start ``mlflow server`` with ``<data_dir>/mlflow.db`` and wait until ``/health`` answers.

    ``artifacts_destination``: ``s3://bucket/prefix`` (then ``s3_env`` must carry
    ``MLFLOW_S3_ENDPOINT_URL`` and the AWS credentials) or a local directory
    (default ``<data_dir>/artifacts``). One worker by default: SQLite serialises writes anyway,
    and the CPU is better spent elsewhere on small machines.
    """
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    backend = f"sqlite:///{data / 'mlflow.db'}"
    dest = artifacts_destination or str(data / "artifacts")
    env = {k: v for k, v in (s3_env or {}).items() if k in _S3_ENV_KEYS or k.startswith("AWS_")}
    if dest.startswith("s3://") and "MLFLOW_S3_ENDPOINT_URL" not in env:
        raise ValueError("artifacts in S3 need s3_env['MLFLOW_S3_ENDPOINT_URL'] (and AWS creds)")
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port),
        "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", dest,
        "--workers", str(workers),
    ]
    proc = ManagedProcess(
        name="mlflow server", argv=argv, log_path=data / "mlflow-server.log",
        health_url=f"http://{host}:{port}/health",
        # No telemetry; and no background job runner: by default the server forks a runner
        # plus ~7 huey consumer processes (GenAI jobs vitpipe never submits), which on a small
        # machine costs more CPU and start-up time than the server itself.
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    proc.start(timeout=timeout)
    return MlflowServer(process=proc, host=host, port=port, backend_store_uri=backend,
                        artifacts_destination=dest, env=env)


@dataclass
class ModelServer:
    """A running ``mlflow models serve``; POST JSON to ``invocations_url``."""

    process: ManagedProcess
    host: str
    port: int
    model_uri: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def invocations_url(self) -> str:
        return f"{self.url}/invocations"

    def stop(self) -> None:
        self.process.stop(grace=5.0)

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_model_server(
    model_uri: str,
    tracking_uri: str,
    log_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> ModelServer:
    """``mlflow models serve -m <model_uri> --env-manager local``; wait until ``/ping`` is 200.

    ``--env-manager local`` serves from this Python environment (vitpipe installed), which is
    what the registered pyfunc declares it needs.
    """
    port = port or free_port(host)
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "-h", host, "-p", str(port), "-w", str(workers)]
    proc = ManagedProcess(
        name=f"mlflow models serve {model_uri}", argv=argv,
        log_path=Path(log_dir) / f"model-server-{port}.log", health_url=f"http://{host}:{port}/ping",
        # uvicorn is launched by name: this interpreter's bin dir must come first on PATH
        env={**(env or {}), "MLFLOW_TRACKING_URI": tracking_uri,
             "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
             "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"},
    )
    proc.start(timeout=timeout, ready=lambda: _ping_ok(f"http://{host}:{port}/ping"))
    return ModelServer(process=proc, host=host, port=port, model_uri=model_uri)


def _ping_ok(url: str) -> bool:
    """``http_ok`` accepts 4xx; the scoring server must answer 200 once the model is loaded."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False
