"""`vitpipe stack down|status` act only on what `up` recorded (real processes, no servers)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from vitpipe.stack import stack_cli
from vitpipe.stack.cli import down, status
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
