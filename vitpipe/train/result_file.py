"""The trainer's answer to whoever launched it, as a file rather than a line of stdout.

A supervisor (``flows/launch.py``) passes ``vitpipe train --result-file PATH``. The main process
writes its result JSON to ``PATH`` atomically when training succeeds; any process that fails
writes ``PATH.rank<N>.error`` with the exception's type, message, time and the end of its
traceback. Scraping stdout for the child's own error line raced with ``accelerate launch``'s
own ``CalledProcessError`` line printed after it; a file per rank cannot be overtaken.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

TRACEBACK_LINES = 25


def _write_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, default=str, indent=2))
    os.replace(tmp, path)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """The main process's result (``run_id``, ``weights``, ...); other ranks write nothing."""
    if _rank() == 0:
        _write_atomic(Path(path), {"ok": True, "result": result})


def write_error(path: str | os.PathLike, err: BaseException) -> None:
    """This rank's failure: what the launcher quotes instead of guessing from output lines."""
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    lines = "".join(tb).rstrip("\n").splitlines()[-TRACEBACK_LINES:]
    _write_atomic(Path(f"{os.fspath(path)}.rank{_rank()}.error"), {
        "ok": False, "rank": _rank(), "time": time.time(), "type": type(err).__name__,
        "message": str(err), "traceback": lines,
    })


def read_errors(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every rank's error record, earliest first (the first failure is usually the cause;
    later ones are peers noticing it)."""
    p = Path(path)
    found = []
    for f in p.parent.glob(f"{p.name}.rank*.error"):
        try:
            found.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(found, key=lambda e: e.get("time", 0.0))


def read_result(path: str | os.PathLike) -> dict[str, Any] | None:
    """The main process's result, or None if it never wrote one."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj.get("result") if obj.get("ok") else None
