"""One Prefect flow per stage, each a thin call into one vitpipe entry point.

Parameters are the stage's typed config (the Prefect UI renders its JSON schema and the server
validates deployment parameters against it); results are small JSON dicts (URIs, MLflow run
ids, model versions, metrics), persisted as JSON so a parent pipeline started through
``run_deployment`` can read them (Prefect docs, "Results": a child's return value must be
persisted to be read).
Each flow publishes its own artifact and reports ``seconds``, its own wall time, so the
pipeline can measure orchestration overhead.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from vitpipe.config import EvaluateConfig, LaunchConfig, RegisterConfig, ShardConfig, TrainConfig

from . import links
from .launch import run_training_process

# Results are tiny dicts: JSON keeps them readable by any process and any Prefect version.
RESULTS = {"persist_result": True, "result_serializer": "json"}


@contextlib.contextmanager
def library_logs() -> Iterator[logging.Logger]:
    """Forward the ``vitpipe`` library's log records into this flow run's logs."""
    run_logger = get_run_logger()
    lib = logging.getLogger("vitpipe")

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            run_logger.log(record.levelno, "%s: %s", record.name, record.getMessage())

    handler = _Forward(logging.INFO)
    old_level = lib.level
    lib.addHandler(handler)
    if lib.getEffectiveLevel() > logging.INFO:
        lib.setLevel(logging.INFO)
    try:
        yield run_logger  # type: ignore[misc]
    finally:
        lib.removeHandler(handler)
        lib.setLevel(old_level)


def container_id() -> str | None:
    """This process's Docker container id (its /etc/hostname bind mount names it), else None.

    With ``network_mode: host`` the hostname is the host's, so it cannot tell containers apart.
    """
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    m = re.search(r"/containers/([0-9a-f]{64})/", text)
    return m.group(1) if m else None


def announce_where(log: Any, stage: str) -> None:
    """One log line per stage run saying where it runs: the host, and its container if any."""
    cid = container_id()
    log.info("%s runs on host %s%s", stage, socket.gethostname(),
             f" in container {cid}" if cid else " (no container)")


def _key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits, dashes)."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")[:100]


def _manifest_fingerprint(uri: str, cfg: ShardConfig) -> str | None:
    """The manifest's bytes as written (None when absent), to tell reuse from a rebuild."""
    from vitpipe import storage

    try:
        return storage.read_bytes(uri, s3=cfg.s3).hex()
    except Exception:  # noqa: BLE001 - absent or unreadable: not a cache hit
        return None


# ---------------------------------------------------------------------------------- shard
@flow(name="shard", **RESULTS)
def shard(config: ShardConfig) -> dict[str, Any]:
    """Source -> WebDataset shards + manifest; unchanged source+config reuses the manifest."""
    from vitpipe.data import read_manifest
    from vitpipe.data import shard as shard_dataset

    t0 = time.monotonic()
    with library_logs() as log:
        announce_where(log, "shard")
        manifest_uri = f"{config.output.rstrip('/')}/manifest.json"
        before = None if config.overwrite else _manifest_fingerprint(manifest_uri, config)
        manifest_uri = shard_dataset(config)
        after = _manifest_fingerprint(manifest_uri, config)
        cached = before is not None and before == after
        m = read_manifest(manifest_uri, config.s3)
        counts = {name: s.count for name, s in m.splits.items()}
        log.info("%s manifest %s (digest %s): %s", "reused cached" if cached else "wrote",
                 manifest_uri, m.digest, counts)
    rows = [{"split": n, "samples": s.count, "shards": len(s.shards),
             "bytes": sum(x.bytes for x in s.shards)} for n, s in m.splits.items()]
    create_markdown_artifact(
        key=_key("shard-manifest"),
        description="Shard manifest summary",
        markdown=(
            f"## Shards {'(cached: source and config unchanged)' if cached else '(written)'}\n\n"
            f"- manifest: `{manifest_uri}`\n- digest: `{m.digest}`\n"
            f"- dataset version: {m.version}"
            + (f" (parent `{m.parent}`)" if m.parent else "") + "\n"
            f"- classes ({len(m.classes)}): {', '.join(map(str, m.classes))}\n"
            f"- image: {m.image_size} x {m.channels} channel(s)\n\n"
            "| split | samples | shards | bytes |\n|---|---|---|---|\n"
            + "".join(f"| {r['split']} | {r['samples']} | {r['shards']} | {r['bytes']} |\n"
                      for r in rows)
        ),
    )
    return {"manifest_uri": manifest_uri, "digest": m.digest, "cached": cached,
            "version": m.version, "parent": m.parent,
            "counts": counts, "seconds": round(time.monotonic() - t0, 3)}


# ------------------------------------------------------------------------------- training
@task(name="train-attempt", cache_policy=NO_CACHE, persist_result=False)
def train_attempt(stage: str, config: TrainConfig, launch: LaunchConfig) -> dict[str, Any]:
    """One ``accelerate launch`` of the trainer; a retry resumes from the newest checkpoint.

    A task rather than the flow carries the retries so that ``launch.max_retries``, a run
    parameter, sets them (a flow's own retries are fixed when its module is imported).
    """
    log = get_run_logger()
    attempt = task_run.get_run_count() or 1
    resume = None
    if attempt > 1:
        resume = "auto"
        log.warning("attempt %d of %s: resuming from the newest checkpoint in %s",
                    attempt, stage, config.checkpoint.dir)
    # The trainer tags its MLflow run with this id (lineage: model version -> flow run).
    run_ref = str(flow_run.get_id() or "")
    env = {"PREFECT__FLOW_RUN_ID": run_ref, "VITPIPE_PREFECT_FLOW_RUN_ID": run_ref}
    result = run_training_process(config, launch, log, resume=resume, env=env,
                                  grace=launch.grace_seconds)
    return {**result, "attempt": attempt}


def run_training(stage: str, config: TrainConfig, launch: LaunchConfig) -> dict[str, Any]:
    """Train under ``launch.max_retries`` attempts, then publish the run's summary artifact."""
    t0 = time.monotonic()
    announce_where(get_run_logger(), stage)
    config = config.as_stage(stage)  # its MLflow run: <stage>/<task>
    result = train_attempt.with_options(
        retries=launch.max_retries, retry_delay_seconds=launch.retry_delay_s,
    )(stage, config, launch)
    attempt = result["attempt"]
    run_id = result.get("run_id")
    metrics = {k: v for k, v in (result.get("metrics") or {}).items()
               if isinstance(v, int | float)}
    charts = links.run_charts_link(config.tracking, run_id)
    for plot in result.get("plots") or [] if run_id else []:  # the task's figures
        url = links.artifact_url(config.tracking, run_id, plot)
        if url:
            create_image_artifact(image_url=url, key=_key(stage, Path(plot).stem),
                                  description=f"{stage}: {Path(plot).stem} (MLflow artifact)")
    create_markdown_artifact(
        key=_key(stage, "summary"),
        description=f"{stage}: training summary",
        markdown=(
            f"## {stage} ({config.mode})\n\n- MLflow run: {links.run_link(config.tracking, run_id)}"
            f"\n- training curves: {charts}"
            f"\n- steps: {result.get('steps')}\n- weights: `{result.get('weights')}`"
            f"\n- checkpoints: `{result.get('checkpoint_dir')}`\n- attempt: {attempt}"
            + ("" if attempt == 1 else " (resumed from the newest checkpoint)")
            + "\n\n| metric | value |\n|---|---|\n"
            + "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(metrics.items()))
        ),
    )
    return {"run_id": run_id, "weights": result.get("weights"),
            "checkpoint_dir": result.get("checkpoint_dir"), "steps": result.get("steps"),
            "metrics": metrics, "attempt": attempt,
            "seconds": round(time.monotonic() - t0, 3)}


@flow(name="pretrain", **RESULTS)
def pretrain(config: TrainConfig, launch: LaunchConfig = LaunchConfig()) -> dict[str, Any]:  # noqa: B008
    """Self-supervised (MAE) or supervised pretraining under ``accelerate launch``."""
    return run_training("pretrain", config, launch)


@flow(name="finetune", **RESULTS)
def finetune(config: TrainConfig, launch: LaunchConfig = LaunchConfig()) -> dict[str, Any]:  # noqa: B008
    """Fine-tuning (or supervised training) under ``accelerate launch``."""
    return run_training("finetune", config, launch)


# ----------------------------------------------------------------------------- evaluate
@flow(name="evaluate", **RESULTS)
def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Metrics, per-class accuracy and plots for trained weights, logged to the training run."""
    from vitpipe.evaluate import evaluate as evaluate_weights

    t0 = time.monotonic()
    with library_logs() as log:
        announce_where(log, "evaluate")
        result = evaluate_weights(config)
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float)}
    per_class = per_class_accuracy(result)
    artifacts = {k: str(v) for k, v in (result.get("artifacts") or {}).items()}
    images = {}
    for name, path in artifacts.items():
        url = (links.artifact_url(config.tracking, config.run_id, f"plots/{Path(path).name}")
               if config.run_id and path.endswith(".png") else None)
        if url:
            images[name] = url
            if name in ("training_curves", "confusion_matrix"):
                create_image_artifact(image_url=url, key=_key("evaluate", name),
                                      description=f"{name} (MLflow artifact of the run)")
    create_markdown_artifact(
        key=_key("evaluate", config.split),
        description=f"evaluation on {config.split}",
        markdown=(
            f"## Evaluation on `{config.split}`\n\n"
            f"- MLflow run: {links.run_link(config.tracking, config.run_id)}\n\n"
            "| metric | value |\n|---|---|\n"
            + "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted(metrics.items()))
            + "\n**Plots**\n\n"
            + "".join(f"- {k}: `{v}`" + (f" ([MLflow]({images[k]}))" if k in images else "")
                      + "\n" for k, v in artifacts.items())
        ),
    )
    if per_class:
        create_table_artifact(key=_key("evaluate", config.split, "per-class"),
                              table=[{"class": c, "accuracy": round(a, 4)}
                                     for c, a in per_class.items()],
                              description=f"per-class accuracy on {config.split}")
    return {"metrics": metrics, "per_class": per_class, "artifacts": artifacts,
            "plot_urls": images,
            "split": config.split, "run_id": result.get("run_id") or config.run_id,
            "seconds": round(time.monotonic() - t0, 3)}


def per_class_accuracy(result: dict[str, Any]) -> dict[str, float]:
    """``{class name: accuracy}``: ``evaluate()`` returns exactly this mapping."""
    return {str(k): float(v) for k, v in result["per_class_accuracy"].items()}


# ----------------------------------------------------------------------------- register
@flow(name="register", **RESULTS)
def register(config: RegisterConfig) -> dict[str, Any]:
    """Register the training run's model and let the promotion gate decide on champion."""
    from vitpipe.registry import register as register_model

    t0 = time.monotonic()
    with library_logs() as log:
        announce_where(log, "register")
        result = register_model(config)
    decision = result.get("decision") or {}
    title = links.model_version_link(config.tracking, result["model_name"], result.get("version"))
    create_markdown_artifact(
        key=_key("register", config.model_name),
        description="registration and promotion decision",
        markdown=(
            f"## {title}\n\n"
            f"- promoted to champion: **{result.get('promoted')}**\n"
            f"- reason: {decision.get('reason', '-')}\n"
            f"- previous champion: {result.get('previous_champion') or 'none'}\n"
            f"- model URI: `{result.get('model_uri')}`\n"
        ),
    )
    keep = ("model_name", "version", "model_uri", "promoted", "previous_champion", "champion",
            "run_id")
    out = {k: result.get(k) for k in keep}
    out["decision"] = {k: v for k, v in decision.items()
                       if isinstance(v, str | int | float | bool | dict | type(None))}
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


STAGE_FLOWS = {"shard": shard, "pretrain": pretrain, "finetune": finetune,
               "evaluate": evaluate, "register": register}
TRAINING_STAGES = ("pretrain", "finetune")
