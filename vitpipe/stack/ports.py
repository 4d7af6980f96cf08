"""The stack's ports, chosen once and reused: ``<dir>/ports.json``.

A restarted stack keeps its URLs, so an earlier shell's environment and the MLflow links inside
earlier Prefect artifacts keep working. A recorded port that another program now holds is
replaced by a free one, and the change is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from .process import free_port, port_is_free

PORTS_FILE = "ports.json"
GRPC_OFFSET = 10000  # SeaweedFS pairs each HTTP port with a gRPC port at +10000
# service -> offsets (besides 0) that must be free too
SPEC: dict[str, tuple[int, ...]] = {
    "s3.master": (GRPC_OFFSET,),
    "s3.volume": (GRPC_OFFSET,),
    "s3.filer": (GRPC_OFFSET,),
    "s3.s3": (GRPC_OFFSET,),
    "mlflow": (),
    "prefect": (),
}


def load_ports(stack_dir: str | Path) -> dict[str, int]:
    """The ports recorded by an earlier ``up`` ({} if none or unreadable)."""
    try:
        data = json.loads((Path(stack_dir) / PORTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if k in SPEC and isinstance(v, int)}


def save_ports(stack_dir: str | Path, ports: dict[str, int]) -> None:
    (Path(stack_dir) / PORTS_FILE).write_text(json.dumps(ports, indent=2) + "\n")


def plan_ports(stack_dir: str | Path, host: str = "127.0.0.1"
               ) -> tuple[dict[str, int], list[str]]:
    """Ports for every service: the recorded ones where still free, else new free ones.

    Returns ``(ports, changes)``; each change says which port moved and why.
    """
    recorded = load_ports(stack_dir)
    ports: dict[str, int] = {}
    changes: list[str] = []
    used: set[int] = set()
    for name, offsets in SPEC.items():
        want = [0, *offsets]
        old = recorded.get(name)
        if old is not None and all(old + d not in used and port_is_free(old + d, host)
                                   for d in want):
            port = old
        else:
            port = free_port(host, also_free=offsets)
            while any(port + d in used for d in want):
                port = free_port(host, also_free=offsets)
            if old is not None:
                held = " or ".join(str(old + d) for d in want)
                changes.append(f"{name}: {old} -> {port} ({held} is in use)")
        ports[name] = port
        used |= {port + d for d in want}
    return ports, changes


__all__ = ["PORTS_FILE", "load_ports", "plan_ports", "save_ports"]
