"""What a pipeline run is made of, so a scheduled retraining means something.

* :func:`inputs_digest`: one hash of what decides the trained weights (the dataset version's
  digest, every training, evaluation and gate setting, the code version), leaving out what only
  says where things go (paths, tracking, retries, orchestration). The pipeline tags the
  fine-tuning run with it (``vitpipe.inputs_digest``).
* :func:`find_trained`: a finished, registered run with the same digest, so the pipeline can
  skip training on exactly the inputs a model version was already trained on.
* :func:`champion_uri`: the current champion as a concrete ``models:/<name>/<version>``, for a
  warm start (``finetune.init: champion``). The digest is taken over the config as written
  (``init: champion``), so an unchanged rerun is recognised even after its own version became
  the champion; the run's ``init`` param names the concrete version it started from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import PipelineConfig, TrackingConfig
from .tracking import git_commit

INPUTS_TAG = "vitpipe.inputs_digest"
CHAMPION_INIT = "champion"  # finetune.init value that means "the registered champion"

# where things go, not what is trained: left out of the digest. The pipeline's own name, its
# shard section (the dataset digest stands for what it made) and orchestration at the top
# level only (``model.name`` is an architecture); the others wherever they appear.
_TOP_LEVEL_KEYS = frozenset({"name", "shard", "orchestration"})
_LOCATION_KEYS = frozenset({
    "output", "output_dir", "checkpoint", "tracking", "progress", "manifest", "run_id",
    "weights", "max_retries", "retry_delay_s", "grace_seconds", "rendezvous_timeout_s",
    "main_process_ip", "main_process_port", "machine_rank", "lock_timeout_s", "lock_ttl_s",
    "s3", "log_every_n_steps", "num_attention_images",
})


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items()) if k not in _LOCATION_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def inputs_digest(cfg: PipelineConfig, dataset_digest: str, code: str | None = None) -> str:
    """SHA-256 over the dataset digest, the settings that decide the result and the code
    version (``code``; default: the git commit and the package version)."""
    top = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _TOP_LEVEL_KEYS}
    body = {"dataset": dataset_digest, "config": _strip(top),
            "code": code or f"{__version__}+{git_commit()}"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Trained:
    """A registered model version trained on given inputs."""

    run_id: str
    version: str
    champion: bool
    metrics: dict[str, float]


def _client(tracking: TrackingConfig):
    from .tracking import Tracker

    tracker = Tracker(tracking)
    tracker.check()
    return tracker.client


def find_trained(tracking: TrackingConfig, model_name: str, digest: str) -> Trained | None:
    """The newest finished run tagged ``digest`` that is a version of ``model_name``."""
    from .registry.register import CHAMPION, alias_version

    client = _client(tracking)
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=20,
        filter_string=f"tags.`{INPUTS_TAG}` = '{digest}' and attributes.status = 'FINISHED'")
    if not runs:
        return None
    champ_mv = alias_version(client, model_name, CHAMPION)
    champ = champ_mv.version if champ_mv else None
    for run in runs:
        versions = client.search_model_versions(
            f"name = '{model_name}' and run_id = '{run.info.run_id}'")
        if versions:
            v = max(versions, key=lambda mv: int(mv.version))
            return Trained(run.info.run_id, str(v.version), str(v.version) == str(champ),
                           dict(run.data.metrics))
    return None


def champion_uri(tracking: TrackingConfig, model_name: str) -> str | None:
    """``models:/<name>/<version>`` of the current champion, None when there is none."""
    from .registry.register import CHAMPION, alias_version

    mv = alias_version(_client(tracking), model_name, CHAMPION)
    return f"models:/{model_name}/{mv.version}" if mv else None
