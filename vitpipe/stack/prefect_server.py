"""A local Prefect server and process worker, for ``vitpipe stack`` and the integration tests.

Both run as :class:`ManagedProcess` children in their own sessions on 127.0.0.1, with all state
(SQLite database, result storage, logs) under one directory, so a test or a laptop stack never
touches ``~/.prefect``. The worker polls every second (Prefect's default 10 s poll makes
every stage start slowly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .process import ManagedProcess, free_port, http_ok

PROCESS_POOL = "vitpipe-process"
# Every pool prefect.yaml deploys to: name -> (worker type, base job template in
# infra/work-pools/, None: the worker's default). `prefect deploy --all` needs all of them.
POOLS: dict[str, tuple[str, str | None]] = {
    PROCESS_POOL: ("process", None),
    "vitpipe-docker": ("docker", "docker.json"),
    "vitpipe-docker-gpu": ("docker", "docker-gpu.json"),
    "vitpipe-k8s": ("kubernetes", "kubernetes.json"),
    "vitpipe-k8s-gpu": ("kubernetes", "kubernetes.json"),
    "vitpipe-k8s-multinode": ("kubernetes", "kubernetes-multinode.json"),
}
GPU_POOLS = ("vitpipe-docker-gpu", "vitpipe-k8s-gpu", "vitpipe-k8s-multinode")


def prefect_bin() -> str:
    """The ``prefect`` executable next to this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).with_name("prefect")
    return str(cand) if cand.exists() else "prefect"


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment that isolates Prefect state under ``home`` and points clients at ``api_url``."""
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_server(data_dir: Path, port: int | None = None, ui: bool = True,
                 timeout: float = 120.0) -> tuple[ManagedProcess, str]:
    """Start ``prefect server start`` on 127.0.0.1 with its SQLite database under ``data_dir``."""
    data_dir = Path(data_dir).resolve()
    home = data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home)
    env.update({
        "PREFECT_UI_ENABLED": "true" if ui else "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    })
    proc = ManagedProcess(
        name="prefect-server",
        argv=[prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log_path=data_dir / "logs" / "prefect-server.log",
        health_url=f"{api_url}/health",
        env=env,
        cwd=str(data_dir),
    )
    proc.start(timeout=timeout)
    return proc, api_url


def create_work_pool(api_url: str, name: str, pool_type: str, home: Path,
                     base_job_template: Path | None = None) -> None:
    """Create (or overwrite) a work pool through the CLI, failing with its output."""
    argv = [prefect_bin(), "--no-prompt", "work-pool", "create", name, "--type", pool_type,
            "--overwrite"]
    if base_job_template is not None:
        argv += ["--base-job-template", str(base_job_template)]
    env = {**os.environ, **prefect_env(home, api_url)}
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"creating work pool {name} failed:\n{res.stdout}\n{res.stderr}")


def create_pools(api_url: str, home: Path, templates: Path,
                 pools: dict[str, tuple[str, str | None]] | None = None,
                 overrides: dict[str, dict] | None = None) -> list[str]:
    """Create or update vitpipe's work pools with their base job templates; GPU pools get a
    concurrency limit of 1 (one training run owns the GPUs; prefect #16127).

    Talks to the API in-process (one import of Prefect instead of one CLI process per pool).
    ``overrides``: pool name -> base job template to use instead of the file's.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    done = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name, (kind, template) in (pools or POOLS).items():
            if overrides and name in overrides:
                base = overrides[name]
            elif template:
                base = json.loads((templates / template).read_text())
            else:
                from prefect.workers.process import ProcessWorker

                base = ProcessWorker.get_default_base_job_template()
            limit = 1 if name in GPU_POOLS else None
            client.create_work_pool(
                WorkPoolCreate(name=name, type=kind, base_job_template=base,
                               concurrency_limit=limit),
                overwrite=True,
            )
            if limit:
                client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
            done.append(name)
    return done


def start_worker(api_url: str, data_dir: Path, pool: str = PROCESS_POOL,
                 env: dict[str, str] | None = None, cwd: str | None = None,
                 query_seconds: float = 1.0, limit: int | None = None,
                 timeout: float = 90.0, worker_type: str = "process") -> ManagedProcess:
    """Start a ``worker_type`` worker on ``pool``; healthy once it serves /health and the
    server lists it online.

    A process worker's ``env`` reaches every flow run it starts (MLflow/S3 endpoints and
    credentials); a docker worker's containers get theirs from the work volume (stack/docker.py).
    """
    data_dir = Path(data_dir).resolve()
    home = data_dir / "prefect"
    port = free_port()
    wenv = prefect_env(home, api_url)
    wenv.update({
        "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "PREFECT_WORKER_WEBSERVER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    })
    wenv.update(env or {})
    argv = [prefect_bin(), "worker", "start", "--pool", pool, "--type", worker_type,
            "--name", f"{pool}-{os.getpid()}-{port}", "--with-healthcheck",
            "--install-policy", "never"]
    if limit:
        argv += ["--limit", str(limit)]
    proc = ManagedProcess(
        name="prefect-worker" if worker_type == "process" else f"{worker_type}-worker {pool}",
        argv=argv,
        log_path=data_dir / "logs" / ("prefect-worker.log" if worker_type == "process"
                                      else f"prefect-worker-{pool}.log"),
        health_url=f"http://127.0.0.1:{port}/health",
        env=wenv,
        cwd=cwd,
    )
    proc.start(timeout=timeout, ready=lambda: http_ok(proc.health_url or "")
               and worker_online(api_url, pool, proc.argv[proc.argv.index("--name") + 1]))
    return proc


def server_healthy(api_url: str) -> bool:
    return http_ok(f"{api_url.rstrip('/')}/health")


def worker_online(api_url: str, pool: str = PROCESS_POOL, name: str | None = None) -> bool:
    """True when the pool reports an ONLINE worker (``name``: that one) - it is polling."""
    import urllib.request

    req = urllib.request.Request(
        f"{api_url.rstrip('/')}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            workers = json.loads(r.read())
    except OSError:
        return False
    return any(w.get("status") == "ONLINE" and (name is None or w.get("name") == name)
               for w in workers)


def main(argv: list[str] | None = None) -> int:
    """``python -m vitpipe.stack.prefect_server create-pools [templates dir]`` against
    ``PREFECT_API_URL`` (compose and Kubernetes setups run this once before deploying)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "create-pools" or not os.environ.get("PREFECT_API_URL"):
        print("usage: PREFECT_API_URL=... python -m vitpipe.stack.prefect_server create-pools"
              " [infra/work-pools]", file=sys.stderr)
        return 2
    templates = Path(args[1] if len(args) > 1 else "infra/work-pools")
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    for name in create_pools(os.environ["PREFECT_API_URL"], home, templates):
        print(f"work pool {name} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
