"""`vitpipe stack`: `down|status` act only on what `up` recorded (real processes); a restarted
stack reuses its ports and S3 key (real servers); `env` prints what to export."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vitpipe.stack import stack_cli
from vitpipe.stack.cli import down, read_env_files, status
from vitpipe.stack.ports import SPEC, plan_ports, save_ports
from vitpipe.stack.process import ManagedProcess


def _sleeper(tmp: Path, name: str) -> ManagedProcess:
    proc = ManagedProcess(name, [shutil.which("sleep") or "sleep", "300"], tmp / f"{name}.log")
    proc.start(timeout=10)
    return proc


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_down_stops_recorded_services_and_nothing_else(tmp_path: Path) -> None:
    ours = _sleeper(tmp_path, "ours")
    other = _sleeper(tmp_path, "other")  # same pid recorded, but not the program `up` started
    assert ours.proc is not None and other.proc is not None
    state = {"api_url": "http://127.0.0.1:9/api", "services": {
        "ours": {"pid": ours.proc.pid, "argv0": "sleep", "health_url": None},
        "recycled": {"pid": other.proc.pid, "argv0": "weed", "health_url": None},
    }}
    (tmp_path / "stack.json").write_text(json.dumps(state))
    # `up`'s services are orphans reaped by init; these are our children: reap them ourselves
    reaper = threading.Thread(target=ours.proc.wait, daemon=True)
    reaper.start()
    try:
        assert status(tmp_path) == {"ours": True, "recycled": False}
        t0 = time.monotonic()
        assert down(tmp_path, grace=5) == ["ours"]
        assert time.monotonic() - t0 < 5  # SIGTERM was enough, no SIGKILL wait
        reaper.join(5)
        assert ours.proc.returncode == -15 and not _alive(ours.proc.pid)
        assert _alive(other.proc.pid)
        assert not (tmp_path / "stack.json").exists()
    finally:
        ours.stop(grace=1)
        other.stop(grace=1)


def test_status_and_down_without_a_stack_say_so(tmp_path: Path, capsys) -> None:
    assert stack_cli("status", str(tmp_path)) == 1
    assert stack_cli("down", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "nothing was started with `stack up`" in err


def _listener(port: int) -> socket.socket:
    """Listen on ``port`` as a real server would: with SO_REUSEADDR, so the TIME_WAIT
    connections a just-stopped server leaves behind do not block the bind (only a live
    listener does, which is what the tests must catch)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_plan_ports_reuses_recorded_ports_and_reports_taken_ones(tmp_path: Path) -> None:
    first, changes = plan_ports(tmp_path)
    assert changes == [] and set(first) == set(SPEC)
    save_ports(tmp_path, first)
    assert plan_ports(tmp_path) == (first, [])
    # another program now listens on the recorded MLflow port (and on S3's gRPC pair)
    with _listener(first["mlflow"]), _listener(first["s3.s3"] + 10000):
        again, changes = plan_ports(tmp_path)
    assert again["mlflow"] != first["mlflow"] and again["s3.s3"] != first["s3.s3"]
    assert {k: v for k, v in again.items() if k not in ("mlflow", "s3.s3")} == {
        k: v for k, v in first.items() if k not in ("mlflow", "s3.s3")}
    assert len(changes) == 2
    assert f"mlflow: {first['mlflow']} -> {again['mlflow']}" in changes[1]
    assert f"{first['s3.s3'] + 10000} is in use" in changes[0]


def _vitpipe(*args: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "vitpipe"), *args], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])


def _exported(out: str) -> dict[str, str]:
    env = {}
    for line in out.splitlines():
        k, v = line.removeprefix("export ").split("=", 1)
        env[k] = shlex.split(v)[0] if v else ""
    return env


@pytest.mark.integration
@pytest.mark.slow
def test_stack_restart_keeps_ports_and_keys_and_env_prints_them(tmp_path: Path) -> None:
    """`up`, `down`, `up`: the same URLs and S3 key; a taken port moves and `up` says so."""
    d = str(tmp_path / "stack")
    res = _vitpipe("stack", "up", "--dir", d)
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        env1 = _exported(_vitpipe("stack", "env", "--dir", d).stdout)
        assert env1 == read_env_files(d) and env1["MLFLOW_TRACKING_URI"].startswith("http://")
        assert "database is locked" not in (Path(d) / "logs/prefect-server.log").read_text()
    finally:
        assert _vitpipe("stack", "down", "--dir", d).returncode == 0
    mlflow_port = int(env1["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    with _listener(mlflow_port):  # another program took MLflow's port meanwhile
        res = _vitpipe("stack", "up", "--dir", d)
        try:
            assert res.returncode == 0, res.stdout + res.stderr
            assert f"mlflow: {mlflow_port} -> " in res.stdout
            env2 = _exported(_vitpipe("stack", "env", "--dir", d).stdout)
            assert env2["MLFLOW_TRACKING_URI"] != env1["MLFLOW_TRACKING_URI"]
            same = ("PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY")
            assert {k: env2[k] for k in same} == {k: env1[k] for k in same}
            assert _vitpipe("stack", "status", "--dir", d).returncode == 0
        finally:
            assert _vitpipe("stack", "down", "--dir", d).returncode == 0


def test_env_without_a_stack_says_so(tmp_path: Path, capsys) -> None:
    assert stack_cli("env", str(tmp_path)) == 1
    assert "nothing was started with `stack up`" in capsys.readouterr().err


def test_docker_pool_template_for_the_local_stack(tmp_path: Path) -> None:
    """`up --docker`: host network, the stack's volume, existing host mounts only, the image's
    Prefect paths (not the worker's), and no GPU request on a host without GPUs."""
    from vitpipe.stack.docker import stack_template

    root = Path(__file__).resolve().parents[1] / "infra" / "work-pools"
    gpu = json.loads((root / "docker-gpu.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    gpu["variables"]["properties"]["volumes"]["default"] += [f"{data}:/data2:ro",
                                                             "/no/such/dir:/x:ro"]
    t = stack_template(gpu, volume="vol-x", gpus=False)
    props = t["variables"]["properties"]
    assert props["network_mode"]["default"] == "host" and props["networks"]["default"] == []
    vols = props["volumes"]["default"]
    assert vols[0] == "vol-x:/var/lib/vitpipe" and f"{data}:/data2:ro" in vols
    assert not any(v.startswith(("vitpipe-work:", "/no/such/dir")) for v in vols)
    env = props["env"]["default"]
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/var/lib/vitpipe/")
    assert props["device_requests"]["default"] == []
    assert gpu["variables"]["properties"]["device_requests"]["default"], "input left intact"
    with_gpus = stack_template(gpu, volume="vol-x", gpus=True)["variables"]["properties"]
    assert with_gpus["device_requests"]["default"][0]["driver"] == "nvidia"


def test_docker_stack_without_a_daemon_says_what_to_run(tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert stack_cli("up", str(tmp_path / "s"), docker=True) == 1
    err = capsys.readouterr().err
    assert "build-local.sh" in err and not (tmp_path / "s" / "stack.json").exists()
