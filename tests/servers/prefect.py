"""A real Prefect server for tests (no mocks), on 127.0.0.1 with its state in a temp dir.

``prefect_server`` (session) yields a :class:`PrefectTestServer` with ``api_url``, ``home`` and
``env`` (what a subprocess needs to talk to it: ``PREFECT_API_URL``, an isolated
``PREFECT_HOME``). It is started by :func:`vitpipe.stack.prefect_server.start_server`, the code
``vitpipe stack up`` uses, and stopped at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vitpipe.stack.prefect_server import prefect_env, start_server
from vitpipe.stack.process import ManagedProcess


@dataclass
class PrefectTestServer:
    api_url: str
    home: Path
    process: ManagedProcess

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **prefect_env(self.home, self.api_url)}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectTestServer]:
    root = tmp_path_factory.mktemp("prefect-server")
    proc, api_url = start_server(root, ui=False)
    try:
        yield PrefectTestServer(api_url=api_url, home=root / "prefect", process=proc)
    finally:
        proc.stop(grace=10)
