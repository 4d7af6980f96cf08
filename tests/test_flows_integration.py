"""End to end through real servers (no mocks): `vitpipe stack up` (SeaweedFS S3, MLflow, Prefect
server, process worker), `prefect deploy --all`, `prefect deployment run 'pipeline/process'` on
real Fashion-MNIST shards in S3; every stage is its own flow run in its own process.

Also: a training process SIGKILLed mid-run is retried by Prefect and resumes from its
checkpoint; bad parameters fail at once naming the key; an unreachable MLflow or S3 fails the
stage with a clear message and the next run succeeds once it is back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FMNIST_DIR
from vitpipe.stack.cli import read_env_files

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                 reason="Fashion-MNIST not installed (make system-deps)")]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "it-vit"


def _tiny_preset(d: Path) -> str:
    """A pipeline preset small enough for CI: 300 images per split, a 2-block ViT."""
    runs = d / "runs"
    return f"""
name: it
seed: 0
model: {{name: vit_tiny_patch4_28, num_classes: 10, depth: 2, embed_dim: 64, num_heads: 2}}
data: {{batch_size: 32, eval_batch_size: 150, num_workers: 0}}
tracking: {{experiment: integration}}
shard:
  source: {{kind: fashion_mnist, path: {FMNIST_DIR}, limit_per_split: 300}}
  output: s3://vitpipe/it/shards
  max_samples_per_shard: 150
  workers: 1
pretrain:
  mode: mae
  train: {{epochs: 1, max_steps: 4, warmup_epochs: 0, num_threads: 1}}
  mae: {{decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}}
  checkpoint: {{dir: {runs}/pretrain/ckpt, every_n_steps: 2}}
  output_dir: {runs}/pretrain
finetune:
  mode: finetune
  init: set-by-the-pipeline
  train: {{epochs: 2, max_steps: 14, warmup_epochs: 0, num_threads: 1}}
  checkpoint: {{dir: {runs}/finetune/ckpt, every_n_steps: 3}}
  output_dir: {runs}/finetune
evaluate: {{split: test, output_dir: {runs}/eval, num_attention_images: 2}}
register: {{model_name: {MODEL_NAME}, metric: test_top1}}
launch: {{cpu: true, max_retries: 2}}
orchestration: {{poll_seconds: 1}}
"""


class Stack:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.env = {**os.environ, **read_env_files(d), "PREFECT_HOME": str(d / "prefect"),
                    "PREFECT_LOCAL_STORAGE_PATH": str(d / "prefect" / "storage")}
        self.state = json.loads((d / "stack.json").read_text())

    def cli(self, *args: str, timeout: float = 300, check: bool = False
            ) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT,
                             env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res

    def run(self, deployment: str, *args: str) -> str:
        """`prefect deployment run` -> the new flow run id."""
        res = self.cli("deployment", "run", deployment, *args, check=True)
        m = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout)
        assert m, res.stdout
        return m.group(1)

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A sync Prefect client on this stack (and its result storage)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_LOCAL_STORAGE_PATH,
            temporary_settings,
        )

        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"],
                                 PREFECT_LOCAL_STORAGE_PATH:
                                     self.env["PREFECT_LOCAL_STORAGE_PATH"]}), \
                get_client(sync_client=True) as c:
            yield c

    def wait(self, run_id: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                run = c.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    return run
                time.sleep(1)
        raise AssertionError(f"flow run {run_id} not final after {timeout}s: {run.state}")

    def logs(self, run_id: str) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        out: list[str] = []
        with self.client() as c:
            while True:
                page = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                   limit=200, offset=len(out))
                out += [log.message for log in page]
                if len(page) < 200:
                    return "\n".join(out)


def _vitpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vitpipe"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("stack")
    res = _vitpipe("stack", "up", "--dir", str(d))
    assert res.returncode == 0, res.stdout + res.stderr
    s = Stack(d)
    try:
        yield s
    finally:
        down = _vitpipe("stack", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr
        left = []
        for name, rec in s.state["services"].items():  # nothing `up` started is left running
            try:
                os.killpg(rec["pid"], 0)
                left.append(name)
            except ProcessLookupError:
                pass
        assert not left, f"still running after `stack down`: {left}"


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> Stack:
    t0 = time.monotonic()
    res = stack.cli("deploy", "--all", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"prefect deploy --all: {time.monotonic() - t0:.1f}s")
    (stack.dir / "it.yaml").write_text(_tiny_preset(stack.dir))
    return stack


def test_stack_is_healthy_and_keeps_credentials_private(stack: Stack) -> None:
    res = _vitpipe("stack", "status", "--dir", str(stack.dir))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("healthy") == 4
    public = (stack.dir / "stack.env").read_text()
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
                "AWS_ENDPOINT_URL", "VITPIPE_S3_BUCKET"):
        assert f"{key}=" in public
    assert "SECRET" not in public
    creds = stack.dir / "credentials.env"
    assert creds.stat().st_mode & 0o777 == 0o600
    assert "AWS_SECRET_ACCESS_KEY=" in creds.read_text()


def test_deployments_and_schedule_are_visible(deployed: Stack) -> None:
    with deployed.client() as c:
        deps = c.read_deployments()
        names = {(c.read_flow(d.flow_id).name, d.name) for d in deps}
        for flow in ("shard", "pretrain", "finetune", "evaluate", "register", "pipeline"):
            for kind in ("process", "docker", "kubernetes"):
                assert (flow, kind) in names
        pipe = c.read_deployment_by_name("pipeline/process")
        assert pipe.schedules and pipe.schedules[0].active
        assert pipe.schedules[0].schedule.cron == "0 3 * * 1"
        assert pipe.schedules[0].parameters == {"preset": "configs/fmnist_cpu.yaml"}
        assert pipe.enforce_parameter_schema
        docker_ft = c.read_deployment_by_name("finetune/docker")
        assert docker_ft.work_pool_name == "vitpipe-docker-gpu"
        # GPUs are the GPU pool's default (infra/work-pools/docker-gpu.json), not per deployment
        pool = c.read_work_pool(docker_ft.work_pool_name)
        gpus = pool.base_job_template["variables"]["properties"]["device_requests"]["default"]
        assert gpus[0]["capabilities"] == [["gpu"]]
        assert "device_requests" not in (docker_ft.job_variables or {})


def test_bad_parameters_fail_at_once_naming_them(deployed: Stack) -> None:
    res = deployed.cli("deployment", "run", "pipeline/process", "--param", "epochz=3")
    assert res.returncode != 0 and "epochz" in res.stdout + res.stderr
    res = deployed.cli("deployment", "run", "pipeline/process", "--params",
                       json.dumps({"config": {"seed": "abc"}}))
    assert res.returncode != 0 and "config.seed" in res.stdout + res.stderr


def _kill_trainer_after_first_checkpoint(ckpt_dir: Path, found: dict[str, Any],
                                         stop: threading.Event) -> None:
    """SIGKILL the fine-tune trainer (not the flow) once its first checkpoint is complete."""
    while not stop.is_set():
        done = sorted(ckpt_dir.glob("*/step_*/COMPLETE"))  # <dir>/<pipeline run>/step_*
        if done:
            ckpt_run_dir = done[0].parent.parent
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                words = [a.decode(errors="replace") for a in argv]
                if "vitpipe.cli" not in words or "accelerate.commands.launch" in words:
                    continue
                cfg_path = words[words.index("--config") + 1] if "--config" in words else ""
                try:
                    cfg = json.loads(Path(cfg_path).read_text())
                except (OSError, ValueError):
                    continue
                if Path(cfg["checkpoint"]["dir"]) == ckpt_run_dir:
                    os.kill(int(proc.name), signal.SIGKILL)
                    found["pid"] = int(proc.name)
                    found["ckpt_dir"] = ckpt_run_dir
                    found["after"] = sorted(p.parent.name for p in
                                            ckpt_run_dir.glob("step_*/COMPLETE"))
                    return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def pipeline_run(deployed: Stack) -> dict[str, Any]:
    """One pipeline run through the worker, with the fine-tune trainer killed mid-run."""
    found: dict[str, Any] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_trainer_after_first_checkpoint,
                              args=(deployed.dir / "runs" / "finetune" / "ckpt", found, stop),
                              daemon=True)
    killer.start()
    run_id = deployed.run("pipeline/process", "--param", f"preset={deployed.dir / 'it.yaml'}")
    try:
        run = deployed.wait(run_id, timeout=900)
    finally:
        stop.set()
    assert run.state.is_completed(), f"{run.state}\n{deployed.logs(run_id)[-4000:]}"
    with deployed.client() as c:
        summary = c.read_flow_run(run_id).state.result()
    return {"run": run, "summary": summary, "killed": found}


def test_pipeline_runs_each_stage_as_its_own_flow_run(deployed: Stack, pipeline_run) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    run, summary = pipeline_run["run"], pipeline_run["summary"]
    assert summary["stages_ran_as"] == "deployments"
    with deployed.client() as c:
        children = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        by_flow = {c.read_flow(r.flow_id).name: r for r in children}
    assert set(by_flow) == {"shard", "pretrain", "finetune", "evaluate", "register"}
    for r in by_flow.values():
        assert r.state.is_completed() and r.deployment_id is not None
    pids = {r.infrastructure_pid for r in [run, *by_flow.values()]}
    assert len(pids) == 6 and None not in pids, pids  # one process per flow run
    # MLflow: a registered version with the champion alias and lineage back to the runs.
    from mlflow import MlflowClient

    ml = MlflowClient(deployed.env["MLFLOW_TRACKING_URI"])
    mv = ml.get_model_version_by_alias(MODEL_NAME, "champion")
    assert mv.version == summary["model_version"]
    assert mv.run_id == summary["finetune_run_id"]
    assert mv.tags["vitpipe.training_run_id"] == summary["finetune_run_id"]
    assert mv.tags["vitpipe.prefect_flow_run_id"] == str(by_flow["register"].id)
    assert mv.tags["vitpipe.dataset_digest"]
    train_tags = ml.get_run(summary["finetune_run_id"]).data.tags
    assert train_tags["vitpipe.prefect_flow_run_id"] == str(by_flow["finetune"].id)
    assert 0.0 <= summary["metrics"]["test_top1"] <= 1.0
    assert summary["manifest_uri"].startswith("s3://vitpipe/it/shards")
    # Prefect artifacts: the pipeline's summary and per-class table, each stage's own.
    with deployed.client() as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "pipeline-summary", "pipeline-per-class-accuracy", "shard-manifest",
            "finetune-summary", "evaluate-test-per-class", f"register-{MODEL_NAME}"])))
    keys = {a.key for a in arts}
    assert keys >= {"pipeline-summary", "pipeline-per-class-accuracy", "shard-manifest",
                    "finetune-summary", f"register-{MODEL_NAME}"}, keys
    md = next(a for a in arts if a.key == "pipeline-summary").data
    assert "test_top1" in md and f"/#/models/{MODEL_NAME}/versions/" in md
    table = json.loads(next(a for a in arts if a.key == "pipeline-per-class-accuracy").data)
    assert len(table) == 10
    # Stage overhead: the pipeline's wall time through the server minus the stages' own work.
    wall = (run.end_time - run.start_time).total_seconds()
    own = sum(t["own"] for t in summary["timings"].values())
    report = {"pipeline_wall_s": round(wall, 1), "stages_own_s": round(own, 1),
              "overhead_s": round(wall - own, 1),
              "per_stage": summary["timings"],
              "prefect_run_time_s": {k: round(r.total_run_time.total_seconds(), 1)
                                     for k, r in by_flow.items()}}
    print("stage overhead:", json.dumps(report))
    (deployed.dir / "overhead.json").write_text(json.dumps(report, indent=2))
    assert wall > own > 0


def test_killed_training_process_is_retried_and_resumes(deployed: Stack, pipeline_run) -> None:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    killed = pipeline_run["killed"]
    assert killed.get("pid"), "the fine-tune trainer was never seen running"
    with deployed.client() as c:
        children = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run["run"].id])))
        ft = next(r for r in children if c.read_flow(r.flow_id).name == "finetune")
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[ft.id])))
        attempt = next(t for t in tasks if t.name.startswith("train-attempt"))
        states = [s.name for s in c.read_task_run_states(attempt.id)]
    # the stage's training task is retried (launch.max_retries), within one flow run
    assert attempt.run_count == 2 and "AwaitingRetry" in states, states
    assert ft.run_count == 1 and ft.state_name == "Completed"
    logs = deployed.logs(str(ft.id))
    assert "attempt 2 of finetune: resuming from the newest checkpoint" in logs
    assert "training process exited" in logs or "killed" in logs
    # checkpoints are scoped to this pipeline run, so the next run will not resume them
    assert killed["ckpt_dir"].name == str(pipeline_run["run"].id)
    first_ckpt = int(killed["after"][0].split("_")[1])
    m = re.search(r"resumed from \S+ at step (\d+)", logs)
    assert m, logs[-3000:]
    assert int(m.group(1)) >= first_ckpt
    assert pipeline_run["summary"]["timings"]["finetune"]["own"] > 0


def _stop_group(pid: int, timeout: float = 20) -> None:
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def outage(deployed: Stack, pipeline_run) -> dict[str, Any]:
    """Bad input and outages, submitted together (they are independent) to keep CI short:
    MLflow stopped -> register fails; a dead S3 endpoint -> shard fails; a misspelt override
    -> the pipeline fails before any stage. Then MLflow is back and the S3 endpoint right:
    register and shard (cached) complete."""
    from concurrent.futures import ThreadPoolExecutor

    from vitpipe.stack.mlflow_server import start_mlflow_server
    from vitpipe.stack.process import free_port

    rec = deployed.state["services"]["mlflow"]
    port = int(re.search(r":(\d+)/", rec["health_url"]).group(1))
    register = json.dumps({"config": {
        "run_id": pipeline_run["summary"]["finetune_run_id"], "model_name": MODEL_NAME,
        "tracking": {"experiment": "integration", "connect_timeout": 3}}})
    shard = {"source": {"kind": "fashion_mnist", "path": str(FMNIST_DIR),
                        "limit_per_split": 300},
             "output": "s3://vitpipe/it/shards", "max_samples_per_shard": 150, "workers": 1}
    dead = {**shard, "s3": {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                            "max_retry_seconds": 2, "connect_timeout": 1}}
    _stop_group(rec["pid"])
    submit = {
        "register_down": ("register/process", "--params", register),
        "shard_dead_s3": ("shard/process", "--params", json.dumps({"config": dead})),
        "bad_override": ("pipeline/process", "--param", f"preset={deployed.dir / 'it.yaml'}",
                         "--param", 'overrides=["finetune.train.epochz=1"]'),
    }
    out: dict[str, Any] = {"dead_endpoint": dead["s3"]["endpoint_url"]}
    with ThreadPoolExecutor(3) as ex:
        ids = {k: deployed.run(*v) for k, v in submit.items()}
        for k, run in zip(ids, ex.map(lambda i: deployed.wait(i, 240), ids.values()),
                          strict=True):
            out[k] = run
    creds = {k: v for k, v in deployed.env.items() if k.startswith(("AWS_", "MLFLOW_S3"))}
    server = start_mlflow_server(deployed.dir / "mlflow", port=port, s3_env=creds,
                                 artifacts_destination="s3://vitpipe/mlflow", timeout=120)
    try:
        with ThreadPoolExecutor(2) as ex:
            again = {"register_back": deployed.run("register/process", "--params", register),
                     "shard_back": deployed.run("shard/process", "--params",
                                                json.dumps({"config": shard}))}
            for k, run in zip(again, ex.map(lambda i: deployed.wait(i, 240), again.values()),
                              strict=True):
                out[k] = run
        with deployed.client() as c:
            out["shard_result"] = c.read_flow_run(out["shard_back"].id).state.result()
    finally:
        server.stop()
    return out


def test_misspelt_override_fails_the_run_at_once(deployed: Stack, outage) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    run = outage["bad_override"]
    assert run.state.is_failed()
    assert "finetune.train.epochz" in run.state.message
    assert "finetune.train.epochs" in run.state.message  # the suggestion
    assert run.total_run_time.total_seconds() < 30
    with deployed.client() as c:  # validated first thing: no stage was started
        assert not c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))


def test_unreachable_mlflow_fails_register_then_recovers(outage) -> None:
    down = outage["register_down"]
    assert down.state.is_failed()
    assert "MLflow tracking server" in down.state.message
    assert "unreachable" in down.state.message
    assert outage["register_back"].state.is_completed(), outage["register_back"].state.message


def test_unreachable_s3_fails_shard_then_recovers(outage) -> None:
    dead = outage["shard_dead_s3"]
    assert dead.state.is_failed()
    assert outage["dead_endpoint"] in dead.state.message, dead.state.message
    back = outage["shard_back"]
    assert back.state.is_completed(), back.state.message
    assert outage["shard_result"]["cached"] is True
    assert outage["shard_result"]["manifest_uri"].startswith("s3://vitpipe/")
