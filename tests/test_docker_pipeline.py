"""Every stage in its own container, for real: the image is built (infra/docker/build-local.sh:
Docker engine, debootstrap base, local package indexes), `vitpipe stack up --docker` adds
Prefect docker workers, and `prefect deployment run 'pipeline/docker'` runs the pipeline flow
and each stage as a flow run in its own container of that image, reading shards from SeaweedFS
S3 and logging to the MLflow server. The fine-tune container is `docker kill`ed after its first
checkpoint: Prefect reports the run Crashed, the pipeline resubmits it, and the new container
resumes from the checkpoint in S3. Afterwards no container, no volume and no stack process is
left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from typing import Any

import pytest

from tests.conftest import FMNIST_DIR
from tests.test_flows_integration import ROOT, Stack, _vitpipe

# the first test builds the image (cold: minutes) and runs the pipeline through containers
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.docker,
              pytest.mark.timeout(2700)]

MODEL_NAME = "it-docker-vit"
STAGES = {"shard", "pretrain", "finetune", "evaluate", "register"}


def _docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {res.stderr}")
    return res.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build (or reuse the cached layers of) vitpipe:0.1.0 from this checkout."""
    t0 = time.monotonic()
    log_dir = tmp_path_factory.mktemp("dockerd")
    res = subprocess.run([str(ROOT / "infra" / "docker" / "build-local.sh")], cwd=ROOT,
                         capture_output=True, text=True, timeout=2400,
                         env={**os.environ, "VITPIPE_DOCKER_LOG_DIR": str(log_dir)})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    print(f"build-local.sh: {time.monotonic() - t0:.0f}s\n{res.stdout}")
    assert shutil.which("docker")
    size = int(_docker("image", "inspect", "vitpipe:0.1.0", "--format", "{{.Size}}"))
    user = _docker("run", "--rm", "--network", "none", "vitpipe:0.1.0", "id", "-u").strip()
    assert user == "10001", "the image must run as its non-root user"
    return {"seconds": time.monotonic() - t0, "size": size, "log": res.stdout}


@pytest.fixture(scope="module")
def docker_stack(image, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("dstack")
    volume = f"vitpipe-it-{uuid.uuid4().hex[:8]}"
    res = _vitpipe("stack", "up", "--docker", "--docker-volume", volume, "--dir", str(d))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "vitpipe-docker" in res.stdout
    s = Stack(d)
    s.volume = volume  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        workers = [r["worker_name"] for r in s.state["services"].values()
                   if r.get("worker_name")]
        down = _vitpipe("stack", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr
        left = [w for w in workers
                if _docker("ps", "-aq", "--filter", f"label=io.prefect.worker-name={w}")]
        _docker("volume", "rm", "-f", volume, check=False)
        assert not left, f"containers left by {left} after `stack down`"
        for name, rec in s.state["services"].items():
            with pytest.raises(ProcessLookupError):
                os.killpg(rec["pid"], 0)
            del name


def _config(stack: Stack) -> dict[str, Any]:
    """A tiny pipeline with paths as the containers see them (S3 for everything shared)."""
    return {
        "name": "it-docker", "seed": 0,
        "model": {"name": "vit_tiny_patch4_28", "num_classes": 10, "depth": 2,
                  "embed_dim": 64, "num_heads": 2},
        "data": {"batch_size": 32, "eval_batch_size": 150, "num_workers": 0},
        "tracking": {"experiment": "integration-docker"},
        "shard": {"source": {"kind": "fashion_mnist", "path": "/data/fashion-mnist",
                             "limit_per_split": 300},
                  "output": "s3://vitpipe/it-docker/shards", "max_samples_per_shard": 150,
                  "workers": 1},
        "pretrain": {"mode": "mae",
                     "train": {"epochs": 1, "max_steps": 2, "warmup_epochs": 0,
                               "num_threads": 1},
                     "mae": {"decoder_embed_dim": 32, "decoder_depth": 1,
                             "decoder_num_heads": 2},
                     "checkpoint": {"dir": "s3://vitpipe/it-docker/ckpt/pretrain",
                                    "every_n_steps": 2},
                     "output_dir": "/var/lib/vitpipe/runs/pretrain"},
        "finetune": {"mode": "finetune", "init": "set-by-the-pipeline",
                     "train": {"epochs": 6, "max_steps": 54, "warmup_epochs": 0,
                               "num_threads": 1},
                     "checkpoint": {"dir": "s3://vitpipe/it-docker/ckpt/finetune",
                                    "every_n_steps": 3},
                     "output_dir": "/var/lib/vitpipe/runs/finetune"},
        "evaluate": {"split": "test", "output_dir": "/var/lib/vitpipe/runs/eval",
                     "num_attention_images": 2},
        "register": {"model_name": MODEL_NAME, "metric": "test_top1"},
        "launch": {"cpu": True, "max_retries": 2},
        "orchestration": {
            "poll_seconds": 1, "weights_via": "mlflow",
            # the host's datasets, read-only, as a GPU host mounts /data
            "job_variables": {"shard": {"volumes": [
                f"{stack.volume}:/var/lib/vitpipe",  # type: ignore[attr-defined]
                f"{FMNIST_DIR}:/data/fashion-mnist:ro"]}},
        },
    }


def _s3(stack: Stack):
    import boto3

    e = stack.env
    return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"],
                        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
                        region_name=e["AWS_DEFAULT_REGION"])


def _kill_finetune_after_first_checkpoint(stack: Stack, found: dict[str, Any],
                                          stop: threading.Event) -> None:
    s3 = _s3(stack)
    while not stop.is_set():
        resp = s3.list_objects_v2(Bucket="vitpipe", Prefix="it-docker/ckpt/finetune/")
        done = sorted(o["Key"] for o in resp.get("Contents", [])
                      if re.search(r"/step_\d+/COMPLETE$", o["Key"]))
        if done:
            ids = _docker("ps", "-q", "--no-trunc", "--filter", "label=io.prefect.flow-name="
                          "finetune", "--filter", "status=running").split()
            if ids:
                _docker("kill", ids[0])
                found.update(container=ids[0], after=done)
                return
        time.sleep(0.2)


def _watch_starts(out: list[str], stop: threading.Event) -> subprocess.Popen:
    """`docker events`: every container start of a flow run, with its flow run id."""
    proc = subprocess.Popen(
        ["docker", "events", "--filter", "type=container", "--filter", "event=start",
         "--format", '{{.ID}} {{index .Actor.Attributes "io.prefect.flow-run-id"}} '
                     '{{index .Actor.Attributes "io.prefect.flow-name"}}'],
        stdout=subprocess.PIPE, text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return proc


@pytest.fixture(scope="module")
def docker_run(docker_stack: Stack) -> dict[str, Any]:
    t0 = time.monotonic()
    res = docker_stack.cli("deploy", "--name", "*/docker", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"prefect deploy --name '*/docker': {time.monotonic() - t0:.1f}s")
    starts: list[str] = []
    stop = threading.Event()
    events = _watch_starts(starts, stop)
    found: dict[str, Any] = {}
    killer = threading.Thread(target=_kill_finetune_after_first_checkpoint,
                              args=(docker_stack, found, stop), daemon=True)
    killer.start()
    params = json.dumps({"config": _config(docker_stack), "preset": None, "overrides": None})
    try:
        run_id = docker_stack.run("pipeline/docker", "--params", params)
        run = docker_stack.wait(run_id, timeout=1500)
    finally:
        stop.set()
        killer.join(10)
        time.sleep(1)
        events.terminate()
    assert run.state.is_completed(), f"{run.state}\n{docker_stack.logs(run_id)[-4000:]}"
    return {"run": run, "starts": starts, "killed": found}


def _children(stack: Stack, parent) -> list[tuple[str, Any]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with stack.client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        return [(c.read_flow(r.flow_id).name, r) for r in runs]


def test_every_stage_runs_in_its_own_container(docker_stack: Stack, docker_run, image) -> None:
    run = docker_run["run"]
    children = _children(docker_stack, run)
    assert {name for name, _ in children} == STAGES
    started = {}  # flow run id -> container id, from the Docker daemon itself
    for line in docker_run["starts"]:
        cid, run_id, _flow = (line.split() + ["", "", ""])[:3]
        if run_id:
            started[run_id] = cid
    runs = [("pipeline", run), *children]
    for name, r in runs:
        assert str(r.id) in started, f"{name} flow run {r.id} started no container"
        # the flow run itself says it ran in that container
        assert "runs on host" in docker_stack.logs(str(r.id))
        assert f"in container {started[str(r.id)]}" in docker_stack.logs(str(r.id)), name
    ids = [started[str(r.id)] for _, r in runs]
    assert len(set(ids)) == len(ids), "two flow runs shared a container"
    # lineage in the registry: the version, its training run and the flow runs behind them
    from mlflow import MlflowClient

    ml = MlflowClient(docker_stack.env["MLFLOW_TRACKING_URI"])
    mv = ml.get_model_version_by_alias(MODEL_NAME, "champion")
    ft = [r for n, r in children if n == "finetune" and r.state.is_completed()]
    reg = [r for n, r in children if n == "register"]
    assert len(ft) == 1 and len(reg) == 1
    assert mv.tags["vitpipe.prefect_flow_run_id"] == str(reg[0].id)
    assert ml.get_run(mv.run_id).data.tags["vitpipe.prefect_flow_run_id"] == str(ft[0].id)
    assert mv.tags["vitpipe.dataset_digest"]
    # per-stage container overhead: submitted -> the flow running in its new container
    overhead = {f"{n}:{str(r.id)[:8]}": round((r.start_time - r.created).total_seconds(), 1)
                for n, r in runs if r.start_time}
    report = {"image_bytes": image["size"], "build_seconds": round(image["seconds"], 1),
              "start_overhead_s": overhead,
              "pipeline_wall_s": round((run.end_time - run.start_time).total_seconds(), 1)}
    print("docker pipeline:", json.dumps(report))
    (docker_stack.dir / "docker-report.json").write_text(json.dumps(report, indent=2))


def test_killed_stage_container_is_resubmitted_and_resumes(docker_stack: Stack,
                                                           docker_run) -> None:
    killed = docker_run["killed"]
    assert killed.get("container"), "the fine-tune container was never seen running"
    fts = [r for n, r in _children(docker_stack, docker_run["run"]) if n == "finetune"]
    crashed = [r for r in fts if r.state.is_crashed()]
    done = [r for r in fts if r.state.is_completed()]
    assert len(crashed) == 1 and len(done) == 1, [r.state.name for r in fts]
    pipeline_logs = docker_stack.logs(str(docker_run["run"].id))
    assert "stage finetune crashed" in pipeline_logs and "resubmitting" in pipeline_logs
    logs = docker_stack.logs(str(done[0].id))
    first = min(int(re.search(r"step_(\d+)/", k).group(1)) for k in killed["after"])
    m = re.search(r"resumed from \S+ at step (\d+)", logs)
    assert m, logs[-3000:]
    assert int(m.group(1)) >= first
    # checkpoints are scoped to the pipeline run, so the next run starts fresh
    assert f"/{docker_run['run'].id}/" in killed["after"][0]
