"""``vitpipe stack up|down|status``: the whole local stack on 127.0.0.1, without Docker.

``up`` starts SeaweedFS (S3), an MLflow server (SQLite backend, artifacts in S3), a Prefect
server and a Prefect process worker on the pool the deployments use, all with data under one
directory, and writes:

- ``stack.env``: ``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``, S3 endpoints, the bucket
  (``set -a; . .stack/stack.env; . .stack/credentials.env; set +a`` loads them),
- ``credentials.env`` (mode 0600): the generated S3 access key and secret,
- ``stack.json``: what ``up`` started (pids, ports, health URLs), so ``down`` stops exactly
  those processes and nothing else,
- ``ports.json``: the ports chosen by the first ``up``; later ones reuse them (and the S3 key
  in ``credentials.env``) unless a port is taken, so URLs and exported environments survive a
  restart. ``vitpipe stack env`` prints the ``export`` lines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import docker as docker_pools
from .ports import plan_ports, save_ports
from .prefect_server import (
    POOLS,
    PROCESS_POOL,
    create_pools,
    prefect_env,
    start_server,
    start_worker,
    worker_online,
)
from .process import ManagedProcess, http_ok

BUCKET = "vitpipe"
STATE = "stack.json"
ENV_FILE = "stack.env"
CRED_FILE = "credentials.env"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StackError(RuntimeError):
    """The stack cannot be started/stopped as asked; the message says what to do."""


def _write_env(path: Path, values: dict[str, str], mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    os.chmod(path, mode)


def read_env_files(stack_dir: str | Path) -> dict[str, str]:
    """The stack's environment (endpoints and credentials) as a dict, for tests and scripts."""
    out: dict[str, str] = {}
    for name in (ENV_FILE, CRED_FILE):
        p = Path(stack_dir) / name
        if p.exists():
            for line in p.read_text().splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    k, v = line.split("=", 1)
                    out[k.strip()] = v.strip()
    return out


def _s3_keys(root: Path) -> dict[str, str]:
    """The S3 key pair of an earlier ``up`` (``credentials.env``), so exported shells keep
    working; {} on the first ``up`` (SeaweedS3 generates one)."""
    creds = read_env_files(root)
    if creds.get("AWS_ACCESS_KEY_ID") and creds.get("AWS_SECRET_ACCESS_KEY"):
        return {"access_key": creds["AWS_ACCESS_KEY_ID"],
                "secret_key": creds["AWS_SECRET_ACCESS_KEY"]}
    return {}


def env_lines(stack_dir: str | Path) -> list[str]:
    """``export K=V`` lines for the stack's environment (``eval "$(vitpipe stack env)"``)."""
    root = Path(stack_dir).resolve()
    values = read_env_files(root)
    if not values:
        raise StackError(f"no {ENV_FILE} in {root} (nothing was started with `stack up`)")
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]


def _record(proc: ManagedProcess, url: str | None) -> dict[str, Any]:
    assert proc.proc is not None
    return {"pid": proc.proc.pid, "argv0": Path(proc.argv[0]).name, "health_url": url,
            "log": str(proc.log_path)}


def up(stack_dir: str | Path, *, ui: bool = True, pool: str = PROCESS_POOL,
       worker_cwd: str | None = None, extra_worker_env: dict[str, str] | None = None,
       docker: bool = False, docker_volume: str = docker_pools.VOLUME,
       image: str = docker_pools.IMAGE) -> dict[str, Any]:
    """Start every service (stopping the ones already started if a later one fails).

    ``docker``: also a docker worker per docker pool (vitpipe-docker, vitpipe-docker-gpu), whose
    flow runs each get their own container of ``image`` sharing ``docker_volume``.
    """
    from .mlflow_server import start_mlflow_server
    from .seaweed import SeaweedS3

    root = Path(stack_dir).resolve()
    if (root / STATE).exists() and any(status(root).values()):
        raise StackError(f"a stack is already running from {root}; "
                         f"`vitpipe stack down --dir {stack_dir}` first")
    # Every pool prefect.yaml names, so `prefect deploy --all` works against this stack.
    templates = Path(worker_cwd or os.getcwd()) / "infra" / "work-pools"
    if docker:
        if not templates.is_dir():
            raise StackError(f"--docker needs the work-pool templates in {templates}: run "
                             "`vitpipe stack up` from the project's root")
        try:
            docker_pools.check_docker(image)
        except docker_pools.DockerUnavailable as err:
            raise StackError(str(err)) from err
    root.mkdir(parents=True, exist_ok=True)
    ports, changes = plan_ports(root)
    started: list[ManagedProcess] = []
    services: dict[str, Any] = {}
    # The Prefect server starts while S3 and MLflow come up (it needs neither).
    pool_exec = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    prefect_future = pool_exec.submit(start_server, root, port=ports["prefect"], ui=ui)
    try:
        s3 = SeaweedS3(root / "s3", **_s3_keys(root),
                       ports={k.removeprefix("s3."): v for k, v in ports.items()
                              if k.startswith("s3.")}).start(timeout=120)
        assert s3.process is not None
        started.append(s3.process)
        s3.make_bucket(BUCKET)
        services["s3"] = _record(s3.process, f"{s3.endpoint_url}/")
        s3_env = s3.env()

        ml = start_mlflow_server(root / "mlflow", port=ports["mlflow"],
                                 artifacts_destination=f"s3://{BUCKET}/mlflow",
                                 s3_env=s3_env, timeout=120)
        started.append(ml.process)
        services["mlflow"] = _record(ml.process, ml.health_url)

        server, api_url = prefect_future.result()
        started.append(server)
        services["prefect-server"] = _record(server, f"{api_url}/health")

        public = {
            "PREFECT_API_URL": api_url,
            "MLFLOW_TRACKING_URI": ml.uri,
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ENDPOINT_URL_S3": s3.endpoint_url,
            "AWS_DEFAULT_REGION": s3.region,
            "AWS_REGION": s3.region,
            "VITPIPE_S3_BUCKET": BUCKET,
            "VITPIPE_WORK_POOL": pool,
        }
        pools = POOLS if templates.is_dir() else {pool: ("process", None)}
        gpus = docker and docker_pools.host_has_gpus()
        overrides = {p: docker_pools.stack_template(
            json.loads((templates / POOLS[p][1]).read_text()), docker_volume, gpus)
            for p in docker_pools.DOCKER_POOLS} if docker else None
        create_pools(api_url, root / "prefect", templates, pools, overrides=overrides)
        secrets = {k: v for k, v in s3_env.items() if k in SECRET_KEYS}
        worker_env = {**public, **secrets, **(extra_worker_env or {})}
        worker = start_worker(api_url, root, pool=pool, env=worker_env,
                              cwd=worker_cwd or os.getcwd())
        started.append(worker)
        services["prefect-worker"] = _record(worker, worker.health_url)
        services["prefect-worker"]["pool"] = pool
        if docker:
            docker_pools.write_secrets(
                {k: v for k, v in worker_env.items() if k.startswith(("AWS_", "MLFLOW_",
                                                                      "VITPIPE_"))},
                volume=docker_volume, image=image)
            for p in docker_pools.DOCKER_POOLS:
                w = start_worker(api_url, root, pool=p, worker_type="docker",
                                 cwd=worker_cwd or os.getcwd())
                started.append(w)
                services[f"docker-worker-{p}"] = {
                    **_record(w, w.health_url), "pool": p,
                    "worker_name": w.argv[w.argv.index("--name") + 1]}
    except BaseException:
        with contextlib.suppress(Exception):  # a server that started after the failure
            started.append(prefect_future.result()[0])
        for proc in reversed(started):
            proc.stop(grace=5)
        raise
    finally:
        pool_exec.shutdown(wait=False)
    _write_env(root / ENV_FILE, public, 0o644)
    _write_env(root / CRED_FILE, secrets, 0o600)
    save_ports(root, ports)
    state = {"dir": str(root), "api_url": api_url, "pool": pool, "services": services,
             "docker": {"volume": docker_volume, "image": image, "gpus": gpus} if docker
             else None,
             "prefect_home": str(root / "prefect"), "ports": ports, "port_changes": changes,
             "started_at": time.time()}
    (root / STATE).write_text(json.dumps(state, indent=2))
    return state


def _load(stack_dir: str | Path) -> dict[str, Any]:
    p = Path(stack_dir).resolve() / STATE
    if not p.exists():
        raise StackError(f"no stack state in {p.parent} (nothing was started with `stack up`)")
    return json.loads(p.read_text())


def _ours(rec: dict[str, Any]) -> bool:
    """The recorded pid is still the process `up` started (not a recycled pid)."""
    try:
        cmd = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # a script's argv[0] is its interpreter: look at the first few words
    return any(Path(c.decode(errors="replace")).name == rec["argv0"] for c in cmd[:3])


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def down(stack_dir: str | Path, grace: float = 10.0) -> list[str]:
    """Stop, in reverse start order, the process groups `up` recorded; return their names."""
    state = _load(stack_dir)
    stopped = []
    for name, rec in reversed(list(state["services"].items())):
        pid = int(rec["pid"])
        # each service leads its own session, so its pid is its process group id
        if not _group_alive(pid):
            continue
        if Path(f"/proc/{pid}").exists() and not _ours(rec):
            continue  # the pid was reused by another program: not ours to stop
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5  # until the killed processes are reaped
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        stopped.append(name)
    workers = [r["worker_name"] for r in state["services"].values() if r.get("worker_name")]
    if workers:  # the flow-run containers those docker workers started (if any are left)
        gone = docker_pools.remove_containers(workers)
        if gone:
            stopped.append(f"{len(gone)} flow-run container(s)")
    (Path(stack_dir).resolve() / STATE).unlink(missing_ok=True)
    return stopped


def status(stack_dir: str | Path) -> dict[str, bool]:
    """Health per service: its process is ours and alive, and its health check answers."""
    state = _load(stack_dir)
    out = {}
    for name, rec in state["services"].items():
        ok = _ours(rec) and (rec.get("health_url") is None or http_ok(rec["health_url"]))
        if ok and name == "prefect-worker":
            ok = worker_online(state["api_url"], rec.get("pool", PROCESS_POOL))
        out[name] = ok
    return out


def stack_cli(action: str, stack_dir: str, docker: bool = False,
              docker_volume: str = docker_pools.VOLUME) -> int:
    """Entry point of ``vitpipe stack``; returns the process exit status."""
    try:
        if action == "up":
            state = up(stack_dir, docker=docker, docker_volume=docker_volume)
            d = Path(state["dir"])
            print(f"stack up in {d}")
            if state["port_changes"]:
                print("ports changed since the last `up` (shells and links that use the old "
                      "ones must be updated):\n  " + "\n  ".join(state["port_changes"]))
            for name, rec in state["services"].items():
                print(f"  {name:15s} pid {rec['pid']:<8d} {rec['health_url']}")
            print(f"\nenv:   eval \"$(vitpipe stack env --dir {stack_dir})\"   "
                  f"(or: set -a; . {d / ENV_FILE}; . {d / CRED_FILE}; set +a)\n"
                  f"UI:    {state['api_url'].removesuffix('/api')} (Prefect), "
                  f"{read_env_files(d)['MLFLOW_TRACKING_URI']} (MLflow)\n"
                  f"next:  prefect --no-prompt deploy --all   # then "
                  f"prefect deployment run 'pipeline/process'")
            if state.get("docker"):
                dk = state["docker"]
                print(f"docker: pools {', '.join(docker_pools.DOCKER_POOLS)} run each flow run "
                      f"in a container of {dk['image']} (volume {dk['volume']}, host network"
                      + (")" if dk["gpus"] else "; no GPU found: vitpipe-docker-gpu runs on "
                         "CPU)") + "\n       prefect deployment run 'pipeline/docker' "
                      "--params '{\"config\": ...}'   (paths inside the image)")
            return 0
        if action == "down":
            names = down(stack_dir)
            print("stopped: " + (", ".join(names) if names else "nothing was running"))
            return 0
        if action == "env":
            print("\n".join(env_lines(stack_dir)))
            return 0
        if action == "status":
            health = status(stack_dir)
            for name, ok in health.items():
                print(f"  {name:15s} {'healthy' if ok else 'DOWN'}")
            return 0 if all(health.values()) else 1
    except StackError as err:
        print(f"vitpipe stack {action}: {err}", file=sys.stderr)
        return 1
    print(f"unknown action {action!r}: up, down, status or env", file=sys.stderr)
    return 2


__all__ = ["down", "env_lines", "prefect_env", "read_env_files", "stack_cli", "status", "up"]
