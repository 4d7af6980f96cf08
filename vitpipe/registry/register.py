"""``vitpipe register``: training run -> pyfunc model version -> ``challenger`` -> gate.

Reads what the training run logged (``config/train_config.json``, ``manifest/manifest.json``,
``weights/model.safetensors``), logs the pyfunc into that run, registers a version with lineage
tags, gives it the ``challenger`` alias, then lets the promotion gate decide on ``champion``
under a registry lock (see :mod:`vitpipe.registry.lock`), re-checking the champion right before
moving the alias. Every decision is written to the version's tags and description.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from PIL import Image

import vitpipe

from ..config import ConfigError, RegisterConfig, TrackingConfig, TrainConfig
from ..errors import TrackingError, VitpipeError
from ..tracking import artifact_errors
from .client import connect, is_already_exists, is_not_found, tracking_errors
from .gate import TAG, Contender, Decision, decide
from .lock import gate_lock
from .pyfunc import (
    ART_MANIFEST,
    ART_META,
    ART_TRAIN_CONFIG,
    ART_WEIGHTS,
    INPUT_COLUMN,
    build_network,
    load_weights,
    signature,
)

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_NAME_IN_RUN = "model"  # the pyfunc's name inside the training run
TRAIN_CONFIG_PATH, MANIFEST_PATH = "config/train_config.json", "manifest/manifest.json"
METRIC_TAG = "vitpipe.metric."
ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")
EVAL_SPLITS = ("test_", "val_", "validation_")


def register(cfg: RegisterConfig) -> dict[str, Any]:
    """Register ``cfg.run_id``'s model as a new version of ``cfg.model_name`` and gate it.

    Returns ``model_name, version, model_uri, promoted, decision, previous_champion``.
    """
    if not cfg.run_id:
        raise ConfigError("register needs run_id: the MLflow run id of a vitpipe training run "
                          "(register.run_id=<id>)")
    client, uri = connect(cfg.tracking)
    with tracking_errors(f"training run '{cfg.run_id}'", uri):
        run = client.get_run(cfg.run_id)
    with tempfile.TemporaryDirectory(prefix="vitpipe-register-") as tmp:
        files = _download_inputs(client, uri, cfg, Path(tmp))
        train_cfg = TrainConfig.model_validate_json(files[ART_TRAIN_CONFIG].read_text())
        from ..data import read_manifest

        manifest = read_manifest(str(files[ART_MANIFEST]))
        # Fail here, with the run named, rather than in a serving process later.
        net = build_network(train_cfg, manifest)
        load_weights(net, files[ART_WEIGHTS])
        files[ART_META].write_text(json.dumps({"top_k": cfg.top_k, "run_id": cfg.run_id}))
        example = _example_input(int(net.in_chans), int(train_cfg.data.augment.img_size
                                                        or net.img_size))
        weights_sha = hashlib.sha256(files[ART_WEIGHTS].read_bytes()).hexdigest()
        onnx_file = _onnx(cfg, net, train_cfg, manifest, Path(tmp)) if cfg.onnx else None
        model_uri = _log_pyfunc(uri, run, files, cfg.top_k, example, onnx_file)
    tags = _lineage_tags(run, manifest, weights_sha)
    name = cfg.model_name

    def create(decision: Decision) -> str:
        """The new version, born with its lineage and decision tags (one request), and the
        ``challenger`` alias."""
        with tracking_errors(f"registering {model_uri} as '{name}'", uri):
            try:
                client.create_registered_model(name)
            except MlflowException as err:
                if not is_already_exists(err):
                    raise
            mv = client.create_model_version(
                name, source=model_uri, run_id=cfg.run_id, tags={**tags, **decision.tags()},
                description=decision.description(), model_id=model_id)
            client.set_registered_model_alias(name, CHALLENGER, mv.version)
        return str(mv.version)

    model_id = model_uri.removeprefix("models:/")
    candidate = Contender(version="", value=run.data.metrics.get(cfg.metric),
                          digest=_eval_digest(run.data.tags))
    decision = promote(client, cfg, candidate, create=create)
    version = decision.candidate_version
    if decision.champion_eval_run:  # the re-evaluation links to both versions
        client.set_tag(decision.champion_eval_run, "vitpipe.reeval.candidate_version", version)
    return {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "logged_model_uri": model_uri,
        "run_id": cfg.run_id,
        "promoted": decision.promoted,
        "decision": decision.as_dict(),
        "previous_champion": decision.previous_champion,
        "champion": version if decision.promoted else decision.previous_champion,
    }


def promote(client: MlflowClient, cfg: RegisterConfig, candidate: Contender,
            create: Callable[[Decision], str] | None = None) -> Decision:
    """Run the gate for ``candidate`` and move ``champion`` if it wins; record the decision.

    Serialised by :func:`gate_lock`. Inside it: read the champion, decide, record (``create``,
    when given, registers the candidate version with the decision already in its tags, else the
    tags are set on the existing ``candidate.version``), then re-read the champion right before
    moving the alias; if it changed meanwhile (someone bypassing the lock), decide again.
    The remaining race window is documented in :mod:`vitpipe.registry.lock`.
    """
    name = cfg.model_name
    decide_ = partial(decide, metric=cfg.metric, higher_is_better=cfg.higher_is_better,
                      margin=cfg.margin, digest_mismatch=cfg.digest_mismatch)

    def gate(cand: Contender, champ_mv: ModelVersion | None) -> Decision:
        if champ_mv is None:
            return decide_(cand, None)
        recorded = contender_of(client, champ_mv, cfg.metric)
        again = _reevaluated(client, cfg, recorded)
        decision = decide_(cand, again or recorded)
        if again is None:
            return decision
        return replace(decision, champion_eval_run=cfg.champion_eval_run_id,
                       champion_recorded=f"{recorded.value} on {recorded.digest}")

    with gate_lock(client, name, ttl=cfg.lock_ttl_s, timeout=cfg.lock_timeout_s):
        champ_mv = alias_version(client, name, CHAMPION)
        decision = gate(candidate, champ_mv)
        if create is not None:
            candidate = replace(candidate, version=create(decision))
            decision = replace(decision, candidate_version=candidate.version)
        else:
            record_decision(client, name, decision)
        for _attempt in range(5):
            if not decision.promoted:
                return decision
            now = alias_version(client, name, CHAMPION)  # the re-check, right before the move
            if _num(now) == _num(champ_mv):
                client.set_registered_model_alias(name, CHAMPION, candidate.version)
                return decision
            champ_mv = now
            decision = gate(candidate, now)
            record_decision(client, name, decision)
        raise TrackingError(f"the champion alias of '{name}' kept moving during promotion "
                            f"of v{candidate.version}; not promoted, retry later")


def record_decision(client: MlflowClient, name: str, decision: Decision) -> None:
    """Decision -> version tags (``vitpipe.gate.*``) and version description."""
    version = decision.candidate_version
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=decision.description())


def rollback(model_name: str, tracking: TrackingConfig | None = None, *,
             lock_timeout_s: float = 60.0) -> dict[str, Any]:
    """Move ``champion`` back to the version it replaced (one step; repeatable).

    The target is the current champion's ``vitpipe.gate.previous_champion`` tag, written when it
    was promoted. Both versions get tags saying what happened.
    """
    client, uri = connect(tracking)
    with gate_lock(client, model_name, timeout=lock_timeout_s):
        current = alias_version(client, model_name, CHAMPION)
        if current is None:
            raise TrackingError(f"registered model '{model_name}' has no champion to roll back "
                                f"(tracking URI {uri})")
        prev = current.tags.get(f"{TAG}previous_champion") or ""
        if not prev:
            raise TrackingError(f"champion v{current.version} of '{model_name}' has no recorded "
                                "previous champion: nothing to roll back to")
        with tracking_errors(f"previous champion '{model_name}' v{prev}", uri):
            client.get_model_version(model_name, prev)
        client.set_registered_model_alias(model_name, CHAMPION, prev)
        client.set_model_version_tag(model_name, current.version, "vitpipe.rollback.demoted_to",
                                     prev)
        client.set_model_version_tag(model_name, prev, "vitpipe.rollback.restored_from",
                                     str(current.version))
    return {"model_name": model_name, "champion": prev, "demoted": str(current.version)}


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``name@alias``, None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if is_not_found(err) or "alias" in str(err.message).lower():
            return None
        raise


def contender_of(client: MlflowClient, mv: ModelVersion, metric: str) -> Contender:
    """The gate's view of a registered version: its metric and eval digest, from its lineage
    tags, else from its own recorded gate decision, else (metric only) from its run."""
    tags = mv.tags
    own = tags.get(f"{TAG}metric") == metric
    raw = tags.get(f"{METRIC_TAG}{metric}") or (tags.get(f"{TAG}candidate_value") if own else "")
    value = float(raw) if raw else None
    if value is None and mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
        except MlflowException:
            value = None
    digest = tags.get("vitpipe.eval_digest") or tags.get(f"{TAG}candidate_digest") or None
    return Contender(version=str(mv.version), value=value, digest=digest)


REEVAL_VERSION_TAG = "vitpipe.reeval.champion_version"
REEVAL_CANDIDATE_TAG = "vitpipe.reeval.candidate_run"


def _reevaluated(client: MlflowClient, cfg: RegisterConfig, champ: Contender
                 ) -> Contender | None:
    """The champion as ``cfg.champion_eval_run_id`` measured it, when that run evaluated this
    very champion version for this candidate; else None (the recorded figures stand)."""
    if not cfg.champion_eval_run_id:
        return None
    run = client.get_run(cfg.champion_eval_run_id)
    tags = run.data.tags
    if tags.get(REEVAL_VERSION_TAG) != champ.version or \
            tags.get(REEVAL_CANDIDATE_TAG) != (cfg.run_id or ""):
        log.warning("run %s evaluated champion v%s for run %s, not v%s for %s: ignored",
                    run.info.run_id, tags.get(REEVAL_VERSION_TAG), tags.get(REEVAL_CANDIDATE_TAG),
                    champ.version, cfg.run_id)
        return None
    return Contender(version=champ.version, value=run.data.metrics.get(cfg.metric),
                     digest=_eval_digest(tags))


def champion_to_reevaluate(cfg: RegisterConfig, candidate_run_id: str) -> dict[str, str] | None:
    """When the champion's metric was measured on another test split than the candidate's:
    the champion's ``models:/<name>/<version>`` URI and the tags its re-evaluation run needs."""
    client, _ = connect(cfg.tracking)
    champ_mv = alias_version(client, cfg.model_name, CHAMPION)
    if champ_mv is None:
        return None
    champ = contender_of(client, champ_mv, cfg.metric)
    theirs = _eval_digest(client.get_run(candidate_run_id).data.tags)
    if not theirs or champ.digest == theirs:
        return None
    return {"uri": f"models:/{cfg.model_name}/{champ.version}",
            REEVAL_VERSION_TAG: champ.version, REEVAL_CANDIDATE_TAG: candidate_run_id}


def _num(mv: ModelVersion | None) -> str | None:
    return None if mv is None else str(mv.version)


def _eval_digest(run_tags: dict[str, str]) -> str | None:
    return run_tags.get("vitpipe.eval_digest") or None


def _download_inputs(client: MlflowClient, uri: str, cfg: RegisterConfig,
                     dst: Path) -> dict[str, Path]:
    """Fetch the three contracted artifacts of the training run; name any that is missing."""
    wanted = {ART_TRAIN_CONFIG: TRAIN_CONFIG_PATH, ART_MANIFEST: MANIFEST_PATH,
              ART_WEIGHTS: cfg.weights_artifact}
    out: dict[str, Path] = {}
    for key, path in wanted.items():
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        with tracking_errors(f"artifact listing of run '{cfg.run_id}'", uri):
            listed = {f.path for f in client.list_artifacts(cfg.run_id, parent or None)}
        if path not in listed:
            raise TrackingError(
                f"run '{cfg.run_id}' has no artifact '{path}' (found under '{parent or '/'}': "
                f"{sorted(listed) or 'nothing'}); register a run logged by `vitpipe train` "
                f"(tracking URI {uri})")
        with tracking_errors(f"artifact '{path}' of run '{cfg.run_id}'", uri), \
                artifact_errors(f"download '{path}' of run '{cfg.run_id}'"):
            local = client.download_artifacts(cfg.run_id, path, str(dst))
        out[key] = Path(local)
    out[ART_META] = dst / "vitpipe_meta.json"
    return out


def _example_input(channels: int, size: int) -> Any:
    """A real (blank) PNG as base64: the request format a serving client should send."""
    import pandas as pd

    img = Image.new("L" if channels == 1 else "RGB", (size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buf.getvalue()).decode("ascii")]})


def _onnx(cfg: RegisterConfig, net: Any, train_cfg: TrainConfig, manifest: Any,
          tmp: Path) -> Path | None:
    """The network as ONNX, with the pyfunc's preprocessing in its metadata (None, and a
    warning, when the ONNX packages are missing)."""
    from ..data.transforms import build_eval_transform
    from .images import mode_for_channels
    from .onnx_export import onnx_metadata, write_onnx

    img = int(train_cfg.data.augment.img_size or net.img_size)
    shape = (int(net.in_chans), img, img)
    meta = onnx_metadata(f"runs:/{cfg.run_id}/{MODEL_NAME_IN_RUN}", list(manifest.classes),
                         shape, mode_for_channels(shape[0]),
                         build_eval_transform(train_cfg.data.augment, manifest, img),
                         list(manifest.mean), list(manifest.std))
    try:
        return write_onnx(net, shape, meta, tmp / "onnx" / "model.onnx")
    except VitpipeError as err:
        log.warning("no ONNX artifact: %s", err)
        return None


def _log_pyfunc(uri: str, run: Any, files: dict[str, Path], top_k: int, example: Any,
                onnx_file: Path | None = None) -> str:
    """Log the pyfunc (and the ONNX file beside it) into the training run (lineage), leaving
    the run's status as it was."""
    mlflow.set_tracking_uri(uri)
    info = run.info
    try:
        with artifact_errors(f"log the pyfunc model of run '{info.run_id}'", info.artifact_uri), \
                mlflow.start_run(run_id=info.run_id, log_system_metrics=False):
            logged = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(ENTRY_POINT),  # models from code: nothing pickled
                artifacts={k: str(v) for k, v in files.items()},
                signature=signature(top_k),
                input_example=example,
                pip_requirements=[f"vitpipe=={vitpipe.__version__}",
                                  f"mlflow=={mlflow.__version__}"],
            )
            if onnx_file is not None:
                mlflow.log_artifact(str(onnx_file), "onnx")
    finally:
        if info.status in ("FINISHED", "FAILED", "KILLED"):
            MlflowClient(uri).set_terminated(info.run_id, status=info.status,
                                             end_time=info.end_time)
    return logged.model_uri


def _lineage_tags(run: Any, manifest: Any, files_sha: str) -> dict[str, str]:
    rt = run.data.tags
    tags = {
        "vitpipe.training_run_id": run.info.run_id,
        "vitpipe.dataset_digest": str(getattr(manifest, "digest", "") or
                                      rt.get("vitpipe.dataset_digest", "")),
        "vitpipe.eval_digest": rt.get("vitpipe.eval_digest", ""),
        "vitpipe.mode": rt.get("vitpipe.mode", ""),
        "vitpipe.git_commit": rt.get("vitpipe.git_commit")
        or rt.get("mlflow.source.git.commit", ""),
        "vitpipe.weights_sha256": files_sha,
    }
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID") or rt.get("vitpipe.prefect_flow_run_id")
    if flow_run:
        tags["vitpipe.prefect_flow_run_id"] = flow_run
    head = _git_head()
    if head:
        tags["vitpipe.register_git_commit"] = head
    for key, value in run.data.metrics.items():
        if key.startswith(EVAL_SPLITS):
            tags[f"{METRIC_TAG}{key}"] = repr(float(value))
    return {k: v for k, v in tags.items() if v != ""}


def _git_head() -> str | None:
    """HEAD of the registering code's checkout, if it is one (bounded, never fatal)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(vitpipe.__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
