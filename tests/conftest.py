"""Shared fixtures. Server fixtures live in tests/servers/*.py and are loaded as plugins."""

from __future__ import annotations

from pathlib import Path

_SERVERS = Path(__file__).parent / "servers"
pytest_plugins = sorted(
    f"tests.servers.{p.stem}" for p in _SERVERS.glob("*.py") if not p.stem.startswith("_")
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
