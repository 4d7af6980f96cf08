"""The ``pipeline`` flow: shard -> [pretrain] -> finetune -> evaluate -> register.

One code path, one switch (``orchestration.stages``): each stage is either an in-process subflow
(the embedded default: ``make run``, no server) or its own flow run of the deployment
``<stage>/<name>`` on its work pool, started with ``run_deployment``. Only small things cross
stage boundaries: the manifest URI, MLflow run ids, weights URIs, the model version.

``python -m flows.pipeline --config configs/fmnist_cpu.yaml [a.b=c ...]`` runs it in Prefect's
ephemeral mode and ends with where to look and how to serve the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelling

from vitpipe.config import ConfigError, PipelineConfig, apply_overrides, read_yaml, validate
from vitpipe.config.pipeline import STAGE_NAMES
from vitpipe.errors import VitpipeError
from vitpipe.lineage import (
    CHAMPION_INIT,
    INPUTS_TAG,
    Trained,
    champion_uri,
    find_trained,
    inputs_digest,
)
from vitpipe.registry.register import champion_to_reevaluate

from . import links
from .stages import STAGE_FLOWS, TRAINING_STAGES, announce_where


class StageFailed(VitpipeError):
    """A stage's flow run ended in a non-Completed state; the pipeline stops with its message."""


def resolve_config(config: PipelineConfig | None, preset: str | None,
                   overrides: list[str] | None) -> PipelineConfig:
    """Preset YAML (or the ``config`` parameter) + dotted overrides -> a validated config."""
    if config is not None and preset:
        raise ConfigError("give either 'config' or 'preset', not both")
    if preset:
        data, source = read_yaml(preset), preset
    elif config is not None:
        data, source = config.model_dump(mode="json"), "parameter 'config'"
    else:
        data, source = {}, "defaults"
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " + overrides"
    return validate(PipelineConfig, data, source)


# ----------------------------------------------------------------------------- stage runner
class StageRunner:
    """Runs one stage as a subflow or as a deployment's flow run, and returns its result."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.log = get_run_logger()
        orch = cfg.orchestration
        self.deployment = orch.deployment or current_deployment.get_name()
        self.stages_as = self._choose(orch.stages)
        self.timings: dict[str, dict[str, float]] = {}

    def _choose(self, wanted: str) -> str:
        if wanted == "subflows":
            return "subflows"
        if wanted == "deployments" and not self.deployment:
            raise ConfigError("orchestration.stages=deployments needs orchestration.deployment"
                              " (the stage deployments' name, e.g. 'process')")
        names = [self.deployment_name(s) for s in self._stages()]
        if wanted == "auto" and (current_deployment.get_id() is None or not self.deployment):
            self.log.info("stages run in-process as subflows (pipeline not run from a deployment)")
            return "subflows"
        missing = self._missing(names)
        if missing and wanted == "auto" and len(missing) == len(names):
            self.log.info("no stage deployments named '%s': stages run as subflows",
                          self.deployment)
            return "subflows"
        if missing:
            raise StageFailed(
                f"stage deployment(s) not found: {', '.join(missing)}. Deploy them with "
                "`prefect deploy --all` (see prefect.yaml) or set orchestration.stages=subflows"
            )
        self.log.info("stages run as deployments: %s", ", ".join(names))
        return "deployments"

    def deployment_name(self, stage: str) -> str:
        dep = self.cfg.orchestration.stage_deployments.get(stage) or self.deployment
        return f"{STAGE_FLOWS[stage].name}/{dep}"

    def _stages(self) -> list[str]:
        return [s for s in STAGE_NAMES if s != "pretrain" or self.cfg.pretrain is not None]

    @staticmethod
    def _missing(names: list[str]) -> list[str]:
        missing = []
        with get_client(sync_client=True) as client:
            for name in names:
                try:
                    client.read_deployment_by_name(name)
                except Exception:  # noqa: BLE001 - ObjectNotFound or a 404 of any kind
                    missing.append(name)
        return missing

    def run(self, stage: str, label: str | None = None, **params: Any) -> dict[str, Any]:
        """Run ``stage`` (timed as ``label``, default the stage) and return its result."""
        t0 = time.monotonic()
        if self.stages_as == "subflows":
            result = STAGE_FLOWS[stage](**params)
        else:
            result = self._run_deployment(stage, params)
        wall = time.monotonic() - t0
        label = label or stage
        self.timings[label] = {"wall": round(wall, 3), "own": float(result.get("seconds", 0))}
        self.log.info("stage %s done in %.1fs (its own work %.1fs)", label, wall,
                      self.timings[label]["own"])
        return result

    def _run_deployment(self, stage: str, params: dict[str, Any]) -> dict[str, Any]:
        name = self.deployment_name(stage)
        payload = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v
                   for k, v in params.items()}
        job_vars = self.cfg.orchestration.job_variables.get(stage) or None
        # Crashed (infrastructure died, pod evicted) is not retried by Prefect's flow retries:
        # resubmit; training resumes from its newest checkpoint.
        resubmits = self.cfg.launch.max_retries if stage in TRAINING_STAGES else 1
        for attempt in range(resubmits + 1):
            child = run_deployment(name, parameters=payload, timeout=0, job_variables=job_vars,
                                   as_subflow=True)
            self.log.info("stage %s: flow run %s (%s) submitted to %s", stage, child.name,
                          child.id, name)
            final = self._wait(child)
            state = final.state
            if state is not None and state.is_completed():
                return self._result(stage, final)
            msg = state.message if state else "no state"
            if state is not None and state.is_crashed() and attempt < resubmits:
                self.log.warning("stage %s crashed (%s); resubmitting (%d/%d)", stage, msg,
                                 attempt + 1, resubmits)
                time.sleep(self.cfg.launch.retry_delay_s)
                continue
            raise StageFailed(f"stage {stage} (flow run {final.name}, {final.id}) ended "
                              f"{state.name if state else 'without a state'}: {msg}")
        raise AssertionError("unreachable")

    def _wait(self, child: FlowRun) -> FlowRun:
        """Poll the child until it is final; if this flow is stopped, cancel the child too."""
        timeout = self.cfg.orchestration.stage_timeout_seconds
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self.cfg.orchestration.poll_seconds
        try:
            with get_client(sync_client=True) as client:
                while True:
                    run = client.read_flow_run(child.id)
                    if run.state is not None and run.state.is_final():
                        return run
                    if deadline is not None and time.monotonic() > deadline:
                        raise StageFailed(f"flow run {child.name} not finished after "
                                          f"{timeout:.0f}s (orchestration.stage_timeout_seconds)")
                    time.sleep(poll)
        except BaseException:
            # Prefect: a child flow run that is not awaited outlives a cancelled parent.
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(child.id)
                if run.state is None or not run.state.is_final():
                    self.log.warning("cancelling stage flow run %s", child.id)
                    client.set_flow_run_state(child.id, Cancelling(), force=True)
            raise

    def _result(self, stage: str, run: FlowRun) -> dict[str, Any]:
        try:
            value = run.state.result(raise_on_failure=True)  # type: ignore[union-attr]
        except Exception as err:  # noqa: BLE001 - turn any retrieval failure into advice
            raise StageFailed(
                f"stage {stage} completed but its result could not be read ({err}). Parent and"
                " stage runs must share result storage: the same PREFECT_LOCAL_STORAGE_PATH"
                " (shared volume) or PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"
            ) from err
        if hasattr(value, "__await__"):
            raise StageFailed(f"stage {stage}: result read returned a coroutine")
        if not isinstance(value, dict):
            raise StageFailed(f"stage {stage}: expected a dict result, got {type(value).__name__}")
        return value


# ---------------------------------------------------------------------------------- flow
def _scope_checkpoints(cfg: Any, scope: str) -> None:
    """Put a training stage's checkpoints under ``<dir>/<pipeline run id>``."""
    if scope:
        cfg.checkpoint.dir = f"{cfg.checkpoint.dir.rstrip('/')}/{scope}"


def _weights_ref(res: dict[str, Any], how: str) -> str:
    """How a later stage should find ``res``'s weights: a path, or the run's MLflow artifact."""
    if how == "mlflow" and res.get("run_id"):
        return f"runs:/{res['run_id']}/weights/{Path(str(res['weights'])).name}"
    return str(res["weights"])


@flow(name="pipeline", log_prints=True, persist_result=True, result_serializer="json")
def pipeline(
    config: PipelineConfig | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train, evaluate and register a ViT; each stage is its own (sub)flow run.

    ``preset``: a pipeline YAML (e.g. configs/fmnist_cpu.yaml) or ``config``: the full typed
    config; ``overrides``: dotted ``key=value`` strings applied on top (validated, with the key
    named on error). When a registered version was already trained on exactly these inputs
    (dataset version, settings, code: :func:`vitpipe.lineage.inputs_digest`) nothing is
    trained and the summary says which version; ``force`` retrains anyway.
    ``finetune.init: champion`` warm-starts from the current champion (the pretrain stage is
    then skipped; with no champion yet the fine-tune trains from scratch).
    """
    cfg = resolve_config(config, preset, overrides)
    log = get_run_logger()
    announce_where(log, "pipeline")
    t0 = time.monotonic()
    runner = StageRunner(cfg)
    scope = (str(current_flow_run.get_id() or "")
             if cfg.orchestration.scope_checkpoints else "")
    how = cfg.orchestration.weights_via

    shard_res = runner.run("shard", config=cfg.shard)
    manifest = shard_res["manifest_uri"]
    # over the config as written: `init: champion` stays a name, so a rerun on the same data
    # finds the version it made even after that version became the champion
    digest = inputs_digest(cfg, shard_res["digest"])
    if not force:
        hit = find_trained(cfg.register.tracking, cfg.register.model_name, digest)
        if hit is not None:
            summary = _already_trained(cfg, runner, shard_res, hit, digest, time.monotonic() - t0)
            _publish(cfg, summary)
            log.info("%s", summary["decision"]["reason"])
            return summary
    warm = _warm_start(cfg, log)

    pre = None
    if cfg.pretrain is not None and not warm:
        pre_cfg = cfg.pretrain.model_copy(deep=True)
        pre_cfg.data.manifest = manifest
        _scope_checkpoints(pre_cfg, scope)
        pre = runner.run("pretrain", config=pre_cfg, launch=cfg.launch)

    ft_cfg = cfg.finetune.model_copy(deep=True)
    ft_cfg.data.manifest = manifest
    ft_cfg.tracking.tags[INPUTS_TAG] = digest
    _scope_checkpoints(ft_cfg, scope)
    if pre is not None and ft_cfg.init:  # the preset's init stands for the pretrain output
        ft_cfg.init = _weights_ref(pre, how)
    ft = runner.run("finetune", config=ft_cfg, launch=cfg.launch)

    ev_cfg = cfg.evaluate.model_copy(deep=True)
    ev_cfg.data.manifest = manifest
    ev_cfg.weights = _weights_ref(ft, how)
    ev_cfg.run_id = ft["run_id"]
    ev = runner.run("evaluate", config=ev_cfg)

    reg_cfg = cfg.register.model_copy(deep=True)
    reg_cfg.run_id = ft["run_id"]
    again = champion_to_reevaluate(reg_cfg, ft["run_id"])
    if again is not None:  # the champion was measured on another test split: measure it here
        re_cfg = ev_cfg.model_copy(deep=True)
        re_cfg.weights, re_cfg.run_id, re_cfg.num_attention_images = again.pop("uri"), None, 0
        re_cfg.output_dir = f"{re_cfg.output_dir.rstrip('/')}/champion"
        re_cfg.tracking.tags.update(again)
        log.info("the champion's metric is from another test split: re-evaluating %s on %s",
                 re_cfg.weights, manifest)
        reg_cfg.champion_eval_run_id = runner.run("evaluate", label="evaluate-champion",
                                                  config=re_cfg)["run_id"]
    reg = runner.run("register", config=reg_cfg)

    wall = time.monotonic() - t0
    own = sum(t["own"] for t in runner.timings.values())
    summary = {
        "name": cfg.name,
        "stages_ran_as": runner.stages_as,
        "manifest_uri": manifest,
        "shard_cached": shard_res.get("cached"),
        "pretrain_run_id": pre["run_id"] if pre else None,
        "finetune_run_id": ft["run_id"],
        "metrics": ev["metrics"],
        "per_class": ev.get("per_class", {}),
        "plots": ev.get("artifacts", {}),
        "plot_urls": ev.get("plot_urls", {}),
        "model_name": reg["model_name"],
        "model_version": reg["version"],
        "model_uri": reg["model_uri"],
        "promoted": reg["promoted"],
        "decision": reg.get("decision", {}),
        "tracking_uri": links.tracking_uri(cfg.register.tracking),
        "skipped": False,
        "inputs_digest": digest,
        "dataset_version": shard_res.get("version"),
        "warm_start": warm,
        "timings": runner.timings,
        "wall_seconds": round(wall, 3),
        "stage_seconds": round(own, 3),
        "overhead_seconds": round(wall - own, 3),
    }
    _publish(cfg, summary)
    log.info("pipeline %s finished in %.1fs; stages' own work %.1fs; overhead %.1fs",
             cfg.name, wall, own, wall - own)
    return summary


def _warm_start(cfg: PipelineConfig, log: Any) -> str | None:
    """Resolve ``finetune.init: champion`` to the champion's ``models:/<name>/<version>`` (in
    ``cfg``: the run's ``init`` param names the very weights it started from)."""
    if cfg.finetune.init != CHAMPION_INIT:
        return None
    uri = champion_uri(cfg.register.tracking, cfg.register.model_name)
    if uri is None:
        log.warning("finetune.init=champion: '%s' has no champion yet; training from scratch",
                    cfg.register.model_name)
        cfg.finetune = cfg.finetune.model_copy(update={"init": None, "mode": "supervised"})
        return None
    log.info("warm start from the champion %s%s", uri,
             "; the pretrain stage is skipped" if cfg.pretrain is not None else "")
    cfg.finetune.init = uri
    return uri


def _already_trained(cfg: PipelineConfig, runner: StageRunner, shard_res: dict[str, Any],
                     hit: Trained, digest: str, wall: float) -> dict[str, Any]:
    """The summary of a run that trained nothing: the version trained on these inputs."""
    name = cfg.register.model_name
    what = "the champion" if hit.champion else "not the champion"
    reason = (f"nothing retrained: {name} v{hit.version} ({what}) was trained on exactly these "
              f"inputs (dataset {shard_res['digest'][:12]}, inputs digest {digest[:12]}, run "
              f"{hit.run_id}); pass force=true (--force) to retrain")
    own = sum(t["own"] for t in runner.timings.values())
    return {
        "name": cfg.name, "stages_ran_as": runner.stages_as,
        "manifest_uri": shard_res["manifest_uri"], "shard_cached": shard_res.get("cached"),
        "pretrain_run_id": None, "finetune_run_id": hit.run_id, "metrics": hit.metrics,
        "per_class": {}, "plots": {}, "plot_urls": {}, "model_name": name,
        "model_version": hit.version, "model_uri": f"models:/{name}/{hit.version}",
        "promoted": hit.champion, "decision": {"reason": reason},
        "tracking_uri": links.tracking_uri(cfg.register.tracking), "skipped": True,
        "inputs_digest": digest, "dataset_version": shard_res.get("version"),
        "warm_start": None, "timings": runner.timings, "wall_seconds": round(wall, 3),
        "stage_seconds": round(own, 3), "overhead_seconds": round(wall - own, 3),
    }


def _publish(cfg: PipelineConfig, s: dict[str, Any]) -> None:
    """The pipeline's artifacts: a markdown summary and a per-class accuracy table."""
    tr = cfg.register.tracking
    metric = cfg.register.metric
    mv = links.model_version_link(tr, s["model_name"], s["model_version"])
    lines = [
        f"# vitpipe pipeline `{cfg.name}`", "",
        f"- **{metric}: {s['metrics'].get(metric, float('nan')):.4f}**",
        f"- model version: {mv} (`{s['model_uri']}`)",
        f"- promotion: **{'promoted to champion' if s['promoted'] else 'not promoted'}**"
        f" - {s['decision'].get('reason', '')}" if not s.get("skipped") else
        f"- **{s['decision']['reason']}**",
        f"- dataset version: {s.get('dataset_version')}; inputs digest `{s.get('inputs_digest')}`"
        + (f"; warm start from `{s['warm_start']}`" if s.get("warm_start") else ""),
        f"- fine-tune run: {links.run_link(tr, s['finetune_run_id'])}",
        *[f"- plot: [{k}]({u})" for k, u in s["plot_urls"].items()],
    ]
    if s["pretrain_run_id"]:
        lines.append(f"- pretrain run: {links.run_link(tr, s['pretrain_run_id'])}")
    lines += [
        f"- shards: `{s['manifest_uri']}`" + (" (cached)" if s["shard_cached"] else ""),
        f"- stages ran as {s['stages_ran_as']}; wall {s['wall_seconds']:.1f}s, stages' own "
        f"{s['stage_seconds']:.1f}s, orchestration overhead {s['overhead_seconds']:.1f}s",
        "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(s["metrics"].items())],
        "", "| stage | wall s | own s |", "|---|---|---|",
        *[f"| {k} | {v['wall']:.1f} | {v['own']:.1f} |" for k, v in s["timings"].items()],
    ]
    create_markdown_artifact(markdown="\n".join(lines), key="pipeline-summary",
                             description=f"pipeline {cfg.name}: metrics, links, promotion")
    if s["per_class"]:
        create_table_artifact(
            table=[{"class": c, "accuracy": round(a, 4)} for c, a in s["per_class"].items()],
            key="pipeline-per-class-accuracy", description="per-class accuracy")


# ------------------------------------------------------------------------------------ CLI
def summary_text(s: dict[str, Any], metric: str) -> str:
    """What `make run` prints last: the score, the plots, the model, and what to run next."""
    uri = s["tracking_uri"]
    alias_uri = f"models:/{s['model_name']}@champion"
    served = alias_uri if s["promoted"] else s["model_uri"]
    plots = "\n".join(f"    {k}: {v}" for k, v in s["plots"].items()) or "    (none)"
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else
          f"open {uri}")
    return f"""
== vitpipe: {s['name']} done ==
{metric}: {s['metrics'].get(metric, float('nan')):.4f}
model: {s['model_uri']} ({_standing(s)})
plots:
{plots}
timing: wall {s['wall_seconds']:.1f}s, stages {s['stage_seconds']:.1f}s, \
overhead {s['overhead_seconds']:.1f}s

serve:   MLFLOW_TRACKING_URI={uri} mlflow models serve -m {served} --env-manager local -p 5001
predict: MLFLOW_TRACKING_URI={uri} vitpipe predict {served} img.png
look:    {ui}
         prefect server start   # then http://127.0.0.1:4200 (runs, logs, artifacts)
"""


def _standing(s: dict[str, Any]) -> str:
    if s.get("skipped"):
        return s["decision"]["reason"]
    return (f"{'promoted to champion' if s['promoted'] else 'not promoted'}; "
            f"gate: {s['decision'].get('reason', '')}")


def quiet_embedded_server() -> None:
    """Switch off the temporary server's telemetry heartbeat (unless the user set it).

    At start-up the heartbeat reads, then inserts, its session row in one deferred SQLite
    transaction while the client's first writes land: in WAL mode a read transaction that
    another connection's commit has overtaken cannot become a write one, so SQLite answers
    "database is locked" at once (``busy_timeout`` does not apply) and Prefect logs an ERROR
    with a traceback (prefect #18934, #15170). The heartbeat only reports usage to Prefect.
    The server is a subprocess that copies ``os.environ`` when the first flow starts.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Prefect waits 20 s (counting only its sleeps) for the temporary server to answer; on two
# busy cores its start (importing the whole server) takes longer, and `make run` died with
# "Timed out while attempting to connect to ephemeral Prefect API server".
EPHEMERAL_STARTUP_SECONDS = 180


@contextlib.contextmanager
def patient_embedded_server() -> Iterator[None]:
    """Wait up to :data:`EPHEMERAL_STARTUP_SECONDS` for the temporary server, unless the user
    set ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` themselves."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT,
    )
    from prefect.settings import temporary_settings

    if TIMEOUT.name in os.environ:
        yield
        return
    with temporary_settings({TIMEOUT: EPHEMERAL_STARTUP_SECONDS}):
        yield


def main(argv: list[str] | None = None) -> int:
    quiet_embedded_server()
    p = argparse.ArgumentParser(prog="python -m flows.pipeline",
                                description="Run the vitpipe pipeline flow (ephemeral Prefect).")
    p.add_argument("--config", "-c", help="pipeline preset YAML, e.g. configs/fmnist_cpu.yaml")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--force", action="store_true",
                   help="train even if a registered version was trained on exactly these inputs")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.train.epochs=1")
    args = p.parse_args(argv)
    try:
        resolve_config(None, args.config, args.overrides)  # fail before Prefect starts
        with patient_embedded_server():
            summary = pipeline(preset=args.config, overrides=args.overrides, force=args.force)
    except ConfigError as err:
        print(f"config error:\n{err}", file=sys.stderr)
        return 2
    except VitpipeError as err:
        print(f"pipeline failed: {err}", file=sys.stderr)
        return 1
    cfg = resolve_config(None, args.config, args.overrides)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(summary_text(summary, cfg.register.metric))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    sys.exit(main())
