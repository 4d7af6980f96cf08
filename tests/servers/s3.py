"""Session-scoped real SeaweedFS S3 server for integration tests (no mocks).

``s3_server`` yields a :class:`vitpipe.stack.seaweed.SeaweedS3`: ``endpoint_url``,
``access_key``, ``secret_key``, ``region``, ``make_bucket(name)``, ``client()`` and ``env()``
(standard AWS variables). ``s3_env`` additionally puts those variables into ``os.environ`` for
one test. The server starts once per session (about 3 s) and is stopped afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vitpipe.stack.seaweed import SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start(timeout=90)
    try:
        yield server
    finally:
        server.stop(grace=3.0)


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The S3 server, with its AWS_* variables set in the environment for this test."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
