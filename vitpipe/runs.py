"""Stage commands chain through MLflow: ``--run <id>|latest`` names a training run, and the
next stage reads from it what it would otherwise need copied by hand.

A training run records its whole config (``config/train_config.json``), its weights
(``weights/model.safetensors``) and its manifest, so evaluation needs only the run id: the
model to build, the data section (manifest included) and the weights all come from the run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .config import ConfigError, TrackingConfig
from .errors import TrackingError
from .tracking import Tracker, redact_uri

_CONFIG_ARTIFACT = "config/train_config.json"


def classifier_modes() -> list[str]:
    """Modes whose runs end in a classifier (weights/model.safetensors): what evaluate and
    register take."""
    from .train.tasks import TASKS

    return sorted(name for name, task in TASKS.items() if task.classifier)


def find_training_run(cfg: TrackingConfig, ref: str) -> str:
    """The run id ``ref`` names: an id (checked to be a classifier's training run) or
    ``latest``, the newest finished one in ``cfg.experiment``."""
    modes = classifier_modes()
    tracker = Tracker(cfg)
    tracker.check()
    client, where = tracker.client, redact_uri(tracker.uri)
    if ref != "latest":
        try:
            run = client.get_run(ref)
        except Exception as err:
            raise TrackingError(f"MLflow run '{ref}' not found at {where}: {err}") from None
        mode = run.data.tags.get("vitpipe.mode")
        if mode not in modes:
            raise ConfigError(f"run '{ref}' is a '{mode}' run, not a classifier's training run "
                              f"({'/'.join(modes)}): it leaves no classifier (MAE pretraining "
                              "leaves only an encoder); pass the fine-tuning run's id")
        return ref
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=100)
    for run in runs:
        if run.data.tags.get("vitpipe.mode") in modes:
            return run.info.run_id
    raise ConfigError(f"--run latest: no finished {'/'.join(modes)} run in MLflow "
                      f"experiment '{cfg.experiment}' at {where}; train one first, or set "
                      "tracking.experiment=<name> to look elsewhere")


def training_config(cfg: TrackingConfig, run_id: str) -> dict[str, Any]:
    """The config the run was trained with (secret values were never recorded)."""
    tracker = Tracker(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracker.client.download_artifacts(run_id, _CONFIG_ARTIFACT, tmp)
            return json.loads(Path(local).read_text())
        except Exception as err:
            raise TrackingError(f"run '{run_id}' has no readable {_CONFIG_ARTIFACT} at "
                                f"{redact_uri(tracker.uri)} (not a vitpipe training run?): "
                                f"{err}") from None


def evaluation_layer(cfg: TrackingConfig, run_id: str) -> dict[str, Any]:
    """What ``vitpipe evaluate --run`` lays over its config: the run's id, model and data."""
    trained = training_config(cfg, run_id)
    return {"run_id": run_id, "model": trained["model"], "data": _known(trained["data"])}


def _known(data: Any) -> Any:
    """Drop values recorded as ``<redacted>``: the current config's own values stand."""
    if isinstance(data, dict):
        return {k: _known(v) for k, v in data.items() if v != "<redacted>"}
    return data
