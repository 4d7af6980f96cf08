"""Start, health-check and stop local server processes (SeaweedFS, MLflow, Prefect).

Used by ``vitpipe stack`` and by the integration tests' fixtures, so both exercise the same code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", also_free: Sequence[int] = (), lo: int = 20000,
              hi: int = 40000) -> int:
    """A free TCP port ``p`` such that ``p + d`` is free too for each ``d`` in ``also_free``.

    SeaweedFS binds gRPC on HTTP port + 10000, so its callers pass ``also_free=(10000,)``.
    """
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        port = rng.randrange(lo, hi)
        if port_is_free(port, host) and all(port_is_free(port + d, host) for d in also_free):
            return port
    raise RuntimeError(f"no free port in {lo}..{hi} on {host}")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers with a 2xx/3xx/4xx status (the server is up and routing)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


@dataclass
class ManagedProcess:
    """A server process in its own session, with a log file and a health check."""

    name: str
    argv: list[str]
    log_path: Path
    health_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0, ready: Callable[[], bool] | None = None) -> None:
        """Start and wait until healthy; on failure, stop it and raise with the log's tail."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
            env={**os.environ, **self.env}, start_new_session=True,
        )
        log.close()
        check = ready or (lambda: http_ok(self.health_url) if self.health_url else True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            if check():
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(
            f"{self.name} not healthy after {timeout:.0f}s ({self.health_url}):\n{tail}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
