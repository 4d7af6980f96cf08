"""One resolver for ``models:/`` URIs (scoring's version column, the trainer's weights)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from vitpipe.tracking import model_version


def test_alias_number_and_latest_resolve_to_the_registered_version(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", str(tmp_path / "a"))
    client.set_registered_model_alias("m", "champion", "2")
    assert str(model_version("models:/m@champion", uri).version) == "2"
    assert str(model_version("models:/m/1", uri).version) == "1"
    assert str(model_version("models:/m/latest", uri).version) == "3"
    client.create_registered_model("empty")
    with pytest.raises(MlflowException, match="no versions"):
        model_version("models:/empty/latest", uri)
    with pytest.raises(MlflowException):
        model_version("models:/m@nope", uri)
