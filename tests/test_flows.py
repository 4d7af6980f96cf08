"""Flow machinery without a server: config resolution, the `accelerate launch` child (real
processes), SIGTERM forwarding to the trainer, and the embedded `make run` path
(`python -m flows.pipeline`, Prefect's ephemeral mode, stages as subflows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.launch import accelerate_argv, launch_env_overrides, run_training_process
from flows.pipeline import resolve_config
from tests.conftest import FMNIST_DIR
from vitpipe.config import ConfigError, LaunchConfig, PipelineConfig, TrainConfig
from vitpipe.config.pipeline import OrchestrationConfig
from vitpipe.errors import TrainingError

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (make system-deps)")
TINY_MODEL = {"name": "vit_tiny_patch4_28", "num_classes": 10, "depth": 2, "embed_dim": 64,
              "num_heads": 2}


# ------------------------------------------------------------------------------ config
def test_preset_plus_overrides_reach_every_stage(tmp_path: Path) -> None:
    cfg = resolve_config(None, str(ROOT / "configs" / "fmnist_cpu.yaml"),
                         ["model.depth=3", "finetune.train.epochs=1", "launch.cpu=true"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.finetune.model.depth == cfg.evaluate.model.depth == 3
    assert cfg.pretrain is None  # the CPU preset has no MAE stage
    gpu = resolve_config(None, str(ROOT / "configs" / "fmnist_gpu.yaml"), ["model.depth=3"])
    assert gpu.pretrain.model.depth == gpu.finetune.model.depth == 3
    assert cfg.finetune.train.epochs == 1 and cfg.launch.cpu
    assert cfg.orchestration.stages == "auto"


def test_bad_overrides_name_the_key_and_suggest_one() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(None, str(ROOT / "configs" / "fmnist_cpu.yaml"),
                       ["finetune.train.epochz=1"])
    assert "finetune.train.epochz" in str(err.value) and "finetune.train.epochs" in str(err.value)
    with pytest.raises(ConfigError, match="launch.num_processes"):
        resolve_config(None, None, ["launch.num_processes=0"])
    with pytest.raises(ConfigError, match="not both"):
        resolve_config(PipelineConfig(), "configs/fmnist_cpu.yaml", None)
    with pytest.raises(ValueError, match="unknown stage"):
        OrchestrationConfig(job_variables={"finetun": {"gpus": 1}})
    with pytest.raises(ValueError, match="machine_rank"):
        LaunchConfig(num_machines=2, machine_rank=2)


# ------------------------------------------------------------------------------ launch
def test_accelerate_command_for_one_and_many_machines(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    one = accelerate_argv(LaunchConfig(cpu=True), cfg, resume="auto")
    assert one[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--cpu" in one and "--multi_gpu" not in one
    i = one.index("--module")
    assert one[i:i + 5] == ["--module", "vitpipe.cli", "train", "--config", str(cfg)]
    assert one[-2:] == ["--resume", "auto"]
    gpu = LaunchConfig(num_processes=8, num_machines=2, machine_rank=1,
                       main_process_ip="job-0.vitpipe-train", main_process_port=29500)
    many = accelerate_argv(gpu, cfg, mixed_precision="bf16")  # the stage's train.mixed_precision
    assert "--multi_gpu" in many
    assert many[many.index("--num_processes") + 1] == "16"  # total over machines
    assert many[many.index("--machine_rank") + 1] == "1"
    assert many[many.index("--main_process_ip") + 1] == "job-0.vitpipe-train"
    assert many[many.index("--mixed_precision") + 1] == "bf16"
    assert many[many.index("--rdzv_conf") + 1] == "timeout=300"
    # several CPU processes must not go through --cpu (accelerate would start only one)
    cpu_two = accelerate_argv(LaunchConfig(cpu=True, num_processes=2), cfg)
    assert "--multi_gpu" in cpu_two and "--cpu" not in cpu_two
    with pytest.raises(TrainingError, match="main_process_ip"):
        accelerate_argv(LaunchConfig(num_machines=2), cfg)


def test_training_processes_get_the_host_cpus_as_threads(tmp_path: Path) -> None:
    from flows.launch import cpu_threads

    ncpu = len(os.sched_getaffinity(0))
    assert cpu_threads(LaunchConfig(), env={}, cuda=False) == ncpu
    assert cpu_threads(LaunchConfig(num_processes=2), env={}, cuda=False) == max(1, ncpu // 2)
    assert cpu_threads(LaunchConfig(), env={"OMP_NUM_THREADS": "3"}, cuda=False) == 3
    assert cpu_threads(LaunchConfig(cpu_threads=5), env={"OMP_NUM_THREADS": "3"}, cuda=False) == 5
    assert cpu_threads(LaunchConfig(), env={}, cuda=True) is None  # GPU host: accelerate's
    assert cpu_threads(LaunchConfig(cpu=True), env={}, cuda=True) == ncpu
    # and accelerate gives the child exactly that many torch threads (it sets 1 otherwise)
    argv = accelerate_argv(LaunchConfig(cpu_threads=2), tmp_path / "c.json")
    script = tmp_path / "threads.py"
    script.write_text("import torch; print('threads', torch.get_num_threads())\n")
    argv = argv[:argv.index("--module")] + [str(script)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert "threads 2" in out.stdout, out.stderr[-2000:]


def test_indexed_job_environment_sets_rank_and_rendezvous() -> None:
    base = LaunchConfig(num_processes=8, num_machines=2, main_process_port=29500)
    env = {"VITPIPE_MULTINODE": "1", "JOB_COMPLETION_INDEX": "1",
           "VITPIPE_MAIN_PROCESS_IP": "train-abc-0.vitpipe-train"}
    got = launch_env_overrides(base, env)
    assert got.machine_rank == 1 and got.main_process_ip == "train-abc-0.vitpipe-train"
    assert launch_env_overrides(base, {}) == base
    with pytest.raises(ValueError, match="machine_rank"):
        launch_env_overrides(base, {**env, "JOB_COMPLETION_INDEX": "2"})


def test_training_child_failure_carries_the_trainers_error(tmp_path: Path) -> None:
    cfg = TrainConfig(model=TINY_MODEL, output_dir=str(tmp_path / "out"),
                      checkpoint={"dir": str(tmp_path / "ckpt")},
                      tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                      data={"manifest": str(tmp_path / "missing" / "manifest.json")})
    lines: list[str] = []
    with pytest.raises(TrainingError) as err:
        run_training_process(cfg, LaunchConfig(cpu=True), lines.append)
    msg = str(err.value)
    first = msg.splitlines()[0]  # the child's own error, from its result file, leads
    assert first.startswith("training process exited with status 1: ManifestNotFound: ")
    assert "manifest" in first and str(tmp_path / "missing") in first
    assert "CalledProcessError" not in first  # accelerate's own line never takes its place
    assert lines[0].startswith("launching: ") and "--cpu" in lines[0]
    assert "--result-file" in lines[0]


def test_failure_message_leads_with_the_first_failing_rank(tmp_path: Path) -> None:
    from flows.launch import describe_failure
    from vitpipe.train.result_file import read_errors, read_result, write_error, write_result

    path = tmp_path / "result.json"
    for rank, exc in ((1, ValueError("bad label in shard 3")),
                      (0, RuntimeError("peer rank 1 is gone"))):
        os.environ["RANK"] = str(rank)
        try:
            try:
                raise exc
            except Exception as e:  # a real traceback, as in the child
                write_error(path, e)
        finally:
            del os.environ["RANK"]
    errors = read_errors(path)
    assert [e["rank"] for e in errors] == [1, 0]  # earliest first
    msg = describe_failure(1, ["some output", "Traceback ..."], errors)
    assert msg.splitlines()[0] == ("training process exited with status 1: "
                                   "ValueError: bad label in shard 3")
    assert "rank 0 also failed: RuntimeError: peer rank 1 is gone" in msg
    assert "raise exc" in msg  # the first failure's own traceback lines
    killed = describe_failure(-9, ["epoch 1"], [])
    assert killed.startswith("training process was killed by SIGKILL before recording")
    assert read_result(path) is None
    write_result(path, {"run_id": "abc"})
    assert read_result(path) == {"run_id": "abc"}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Real Fashion-MNIST shards, 200 images per split."""
    from vitpipe.config import ShardConfig
    from vitpipe.data import shard

    out = tmp_path_factory.mktemp("flow-shards") / "fmnist"
    return shard(ShardConfig(source={"kind": "fashion_mnist", "path": str(FMNIST_DIR),
                                     "limit_per_split": 200},
                             output=str(out), max_samples_per_shard=100, workers=1))


class _Stop(Exception):
    """Stands in for Prefect's TerminationSignal (raised in the flow's main thread)."""


@needs_fmnist
def test_stop_forwards_sigterm_so_the_trainer_checkpoints(tmp_path: Path,
                                                          tiny_shards: str) -> None:
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(model=TINY_MODEL, output_dir=str(tmp_path / "out"),
                      checkpoint={"dir": str(ckpt), "every_n_steps": 1000},
                      tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                      data={"manifest": tiny_shards, "batch_size": 16, "num_workers": 0},
                      train={"epochs": 50, "warmup_epochs": 0, "num_threads": 1})
    seen: list[str] = []

    def log(line: str) -> None:
        seen.append(line)
        if "step" in line and "%|" in line:  # the training loop is running: stop the flow
            raise _Stop()

    with pytest.raises(_Stop):
        run_training_process(cfg, LaunchConfig(cpu=True), log, grace=60)
    assert any(line.startswith("stopping training processes") for line in seen)
    done = sorted(ckpt.glob("step_*/COMPLETE"))
    assert done, "no checkpoint written on SIGTERM; output:\n" + "\n".join(seen[-20:])
    # nothing is left running: the child tree was waited for
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------------------ make run
@needs_fmnist
@pytest.mark.parametrize("pretrain", [None, "supervised"], ids=["no-pretrain", "supervised-pt"])
def test_embedded_pipeline_runs_stages_as_subflows(tmp_path: Path, tiny_shards: str,
                                                   pretrain: str | None) -> None:
    """`python -m flows.pipeline --config X` (the `make run` path) in Prefect's ephemeral mode;
    with ``pretrain.mode: supervised`` that stage's classifier starts the fine-tune."""
    runs = tmp_path / "runs"
    preset = {
        "name": "embedded", "model": TINY_MODEL,
        "data": {"batch_size": 32, "eval_batch_size": 100, "num_workers": 0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "embedded",
                     "artifact_location": str(tmp_path / "mlartifacts")},
        "shard": {"source": {"kind": "fashion_mnist", "path": str(FMNIST_DIR),
                             "limit_per_split": 200},
                  "output": str(Path(tiny_shards).parent), "max_samples_per_shard": 100,
                  "workers": 1},
        "finetune": {"mode": "supervised", "train": {"epochs": 1, "max_steps": 4,
                                                     "warmup_epochs": 0, "num_threads": 1},
                     "checkpoint": {"dir": str(runs / "ft" / "ckpt")},
                     "output_dir": str(runs / "ft")},
        "evaluate": {"split": "test", "output_dir": str(runs / "eval"),
                     "num_attention_images": 1},
        "register": {"model_name": "embedded-vit"},
        "launch": {"cpu": True},
    }
    if pretrain:
        preset["pretrain"] = {"mode": pretrain, "train": preset["finetune"]["train"],
                              "checkpoint": {"dir": str(runs / "pt" / "ckpt")},
                              "output_dir": str(runs / "pt")}
        preset["finetune"] |= {"mode": "finetune", "init": "set-by-the-pipeline"}
    path = tmp_path / "embedded.yaml"
    path.write_text(json.dumps(preset))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED":
                "false", "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results")})
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--config", str(path),
                          "finetune.train.max_steps=3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    out = res.stdout
    assert "== vitpipe: embedded done ==" in out
    assert "test_top1:" in out and "models:/embedded-vit/1" in out
    assert "mlflow models serve -m models:/embedded-vit@champion --env-manager local -p 5001" \
        in out
    assert f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'}" in out
    assert "vitpipe predict models:/embedded-vit@champion img.png" in out
    assert "prefect server start" in out and "mlflow ui --backend-store-uri" in out
    assert str(runs / "eval") in out  # where the plots are
    assert "stages run in-process as subflows" in res.stderr + out
    assert "reused cached manifest" in res.stderr + out  # the shard stage reused the shards
    if pretrain:
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = client.get_experiment_by_name("embedded").experiment_id
        modes = {r.data.tags["vitpipe.mode"]: r.data.params
                 for r in client.search_runs([exp]) if "vitpipe.mode" in r.data.tags}
        assert modes.keys() >= {"supervised", "finetune"}, modes.keys()
        names = {r.info.run_name for r in client.search_runs([exp])}
        assert names >= {"pretrain/supervised", "finetune/finetune"}, names
        assert modes["finetune"]["init"] == str(runs / "pt" / "model.safetensors")


def test_embedded_server_gets_time_to_start_unless_the_user_chose(monkeypatch) -> None:
    """`make run` on busy cores: Prefect's 20 s wait for its temporary server is too short."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

    from flows.pipeline import EPHEMERAL_STARTUP_SECONDS, patient_embedded_server

    monkeypatch.delenv(timeout.name, raising=False)
    before = timeout.value()
    with patient_embedded_server():
        assert timeout.value() == EPHEMERAL_STARTUP_SECONDS >= 120
    assert timeout.value() == before
    monkeypatch.setenv(timeout.name, "7")  # the user's own value is left alone
    with patient_embedded_server():
        assert timeout.value() == before


_RETRY_SCRIPT = """
import json, sys
from flows.stages import finetune
from vitpipe.config import LaunchConfig, TrainConfig
cfg = TrainConfig.model_validate_json(sys.argv[1])
try:
    out = finetune(config=cfg, launch=LaunchConfig(cpu=True, max_retries=int(sys.argv[2]),
                                                   retry_delay_s=0))
except Exception as e:  # noqa: BLE001
    out = {"error": f"{type(e).__name__}: {e}"}
print("RESULT " + json.dumps(out))
"""


@needs_fmnist
@pytest.mark.parametrize("retries", [1, 0])
def test_training_stage_retries_from_launch_config_and_resumes(tmp_path: Path, tiny_shards: str,
                                                               retries: int) -> None:
    """``launch.max_retries``, a run parameter, is the stage's retry count: a trainer killed
    after step 3 is retried once, resuming from the step-2 checkpoint, or with 0 the stage
    fails with the kill named."""
    cfg = TrainConfig(model=TINY_MODEL, output_dir=str(tmp_path / "out"), mode="supervised",
                      checkpoint={"dir": str(tmp_path / "ckpt"), "every_n_steps": 2},
                      tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                      data={"manifest": tiny_shards, "batch_size": 16, "num_workers": 0},
                      train={"epochs": 1, "max_steps": 5, "warmup_epochs": 0,
                             "num_threads": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "VITPIPE_FAULT_KILL_AT_STEP": "3", "VITPIPE_FAULT_ONCE": str(tmp_path / "once")})
    res = subprocess.run([sys.executable, "-c", _RETRY_SCRIPT, cfg.model_dump_json(),
                          str(retries)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    logs = res.stdout + res.stderr
    assert res.returncode == 0, logs[-5000:]
    out = json.loads(logs.split("RESULT ", 1)[1].splitlines()[0])
    assert (tmp_path / "once").exists()  # the fault fired
    if retries:
        assert out.get("attempt") == 2 and out["steps"] == 5, logs[-5000:]
        assert "attempt 2 of finetune: resuming from the newest checkpoint" in logs
        assert "step_000000002" in logs  # the checkpoint it resumed from
    else:
        assert "error" in out and "SIGKILL" in out["error"], out
        assert "attempt 2" not in logs
