"""Containers and infrastructure, checked without a Docker engine or a cluster.

Dockerfile: hadolint. Compose: the compose-spec JSON schema (vendored in check-jsonschema).
Kubernetes: kubernetes-validate (strict). Work-pool templates: rendered by Prefect's own
worker job-configuration classes with the job variables prefect.yaml gives, then the rendered
Job validated as Kubernetes and the Docker device requests built by docker-py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from vitpipe.stack.prefect_server import POOLS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"


def _bin(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _pool_vars(kind: str, flow: str) -> tuple[str, dict[str, Any]]:
    """(work pool name, job variables) that prefect.yaml gives deployment ``flow/kind``."""
    for d in _prefect_yaml()["deployments"]:
        if d["name"] == kind and d["entrypoint"].endswith(f":{flow}"):
            return d["work_pool"]["name"], d["work_pool"].get("job_variables", {})
    raise AssertionError(f"no deployment {flow}/{kind} in prefect.yaml")


# ------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_passes_hadolint_and_runs_as_non_root() -> None:
    res = subprocess.run([_bin("hadolint"), str(ROOT / "Dockerfile")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "requirements.lock" in text and "ENTRYPOINT" in text
    lock = (INFRA / "docker" / "requirements.lock").read_text().splitlines()
    reqs = [ln for ln in lock if ln.strip() and not ln.startswith("#")]
    assert reqs and all("==" in ln for ln in reqs), "every image dependency must be pinned"
    for pkg in ("torch==", "prefect==", "mlflow==", "accelerate==", "prefect-docker==",
                "prefect-kubernetes=="):
        assert any(ln.startswith(pkg) for ln in reqs), pkg


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    text = (ROOT / ".dockerignore").read_text()
    assert text.splitlines()[1].strip() == "**" or "**" in text.splitlines()
    assert "**/.env" in text


def test_entrypoint_sources_env_file_and_routes_followers(tmp_path: Path) -> None:
    entry = INFRA / "docker" / "entrypoint.sh"
    assert entry.stat().st_mode & stat.S_IXUSR
    env_file = tmp_path / "vitpipe.env"
    env_file.write_text("MLFLOW_TRACKING_URI='http://mlflow:5000'\n")
    base = {"PATH": os.environ["PATH"], "VITPIPE_ENV_FILE": str(env_file)}
    out = subprocess.run([str(entry), "sh", "-c", "echo $MLFLOW_TRACKING_URI"], env=base,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "http://mlflow:5000"
    # A non-zero rank of a multi-node job becomes a follower of its flow run.
    env = {**base, "VITPIPE_MULTINODE": "1", "JOB_COMPLETION_INDEX": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([str(entry), "false"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert "PREFECT__FLOW_RUN_ID is not set" in res.stderr


# ------------------------------------------------------------------------------ compose
def test_compose_file_matches_compose_spec_and_keeps_secrets_out() -> None:
    compose = INFRA / "compose.yaml"
    res = subprocess.run([_bin("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(compose)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    data = yaml.safe_load(compose.read_text())
    services = data["services"]
    for name in ("postgres", "prefect-server", "prefect-worker", "mlflow", "s3", "gpu-worker"):
        assert name in services, name
    assert "postgresql" in " ".join(services["mlflow"]["command"])
    assert "s3://" in " ".join(services["mlflow"]["command"])
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"][
        "PREFECT_API_DATABASE_CONNECTION_URL"]
    # Secrets only as ${VAR} references, every one documented in .env.example.
    text = compose.read_text()
    example = (INFRA / ".env.example").read_text()
    for var in set(re.findall(r"(?<!\$)\$\{([A-Z_0-9]+)", text)):  # $${X}: container shell
        assert re.search(rf"^{var}=", example, flags=re.M), f"{var} missing in .env.example"
    for svc in services.values():
        for key, val in (svc.get("environment") or {}).items():
            if any(m in key for m in ("PASSWORD", "SECRET")):
                assert str(val).startswith("${"), f"{key} must come from the env file"
    # The GPU worker's pool gets GPUs through device requests (infra/work-pools/docker.json).
    assert "vitpipe-docker-gpu" in services["gpu-worker"]["command"]


# ------------------------------------------------------------------------------ kubernetes
@pytest.mark.parametrize("path", sorted((INFRA / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifests_are_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_worker_rbac_allows_jobs_and_pods() -> None:
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "rbac.yaml").read_text()) if d]
    role = next(d for d in docs if d["kind"] == "Role")
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "delete", "watch"} <= verbs[("batch", "jobs")]
    assert {"get", "list", "watch"} <= verbs[("", "pods")]
    workers = [d for d in yaml.safe_load_all((INFRA / "k8s" / "worker.yaml").read_text()) if d]
    pools = {next(a for i, a in enumerate(w["spec"]["template"]["spec"]["containers"][0]["args"])
                  if w["spec"]["template"]["spec"]["containers"][0]["args"][i - 1] == "--pool")
             for w in workers}
    assert pools == {"vitpipe-k8s", "vitpipe-k8s-gpu", "vitpipe-k8s-multinode"}
    for w in workers:
        assert w["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"


# ------------------------------------------------------------------------------ work pools
def test_work_pool_templates_are_up_to_date() -> None:
    """The committed JSON is what infra/work-pools/build.py derives from the installed workers."""
    sys.path.insert(0, str(INFRA / "work-pools"))
    try:
        import build  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    for name, tmpl in (("docker.json", build.docker_template()),
                       ("docker-gpu.json", build.docker_template(gpu=True)),
                       ("kubernetes.json", build.kubernetes_template()),
                       ("kubernetes-multinode.json", build.kubernetes_template(multinode=True))):
        committed = json.loads((INFRA / "work-pools" / name).read_text())
        assert committed == tmpl, f"{name} is stale: run python infra/work-pools/build.py"


def _flow_run():
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name="tidy-otter", flow_id=uuid.uuid4())


def _render(config_cls, template: dict[str, Any], values: dict[str, Any], api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        with temporary_settings({PREFECT_API_URL: api_url}):
            async with get_client() as client:
                return await config_cls.from_template_and_values(template, values, client=client)

    return asyncio.run(go())


def test_docker_gpu_template_renders_image_gpus_and_env(prefect_server) -> None:
    import docker.types
    from prefect_docker.worker import DockerWorkerJobConfiguration

    template = json.loads((INFRA / "work-pools" / "docker-gpu.json").read_text())
    pool, job_vars = _pool_vars("docker", "finetune")
    assert pool == "vitpipe-docker-gpu" and POOLS[pool][1] == "docker-gpu.json"
    values = {**job_vars, "env": {"VITPIPE_EXAMPLE": "3"}}
    cfg = _render(DockerWorkerJobConfiguration, template, values, prefect_server.api_url)
    cfg.prepare_for_flow_run(_flow_run())
    assert cfg.image == "vitpipe:0.1.0"
    assert cfg.env["VITPIPE_EXAMPLE"] == "3"
    assert cfg.env["PREFECT__FLOW_RUN_ID"]
    assert "vitpipe-work:/var/lib/vitpipe" in cfg.volumes
    kwargs = cfg.container_create_kwargs
    assert kwargs["shm_size"] == "16g"
    # docker-py turns the dicts into the HostConfig.DeviceRequests the daemon gets.
    host = docker.types.HostConfig(version="1.44", device_requests=kwargs["device_requests"])
    req = host["DeviceRequests"][0]
    assert req["Driver"] == "nvidia" and req["Count"] == -1 and req["Capabilities"] == [["gpu"]]
    # CPU stages ask for no GPU at all.
    cpu_pool, cpu_vars = _pool_vars("docker", "shard")
    cpu_template = json.loads((INFRA / "work-pools" / POOLS[cpu_pool][1]).read_text())
    cpu = _render(DockerWorkerJobConfiguration, cpu_template, cpu_vars, prefect_server.api_url)
    assert cpu.container_create_kwargs["device_requests"] == []


def _k8s_job(template_name: str, values: dict[str, Any], api_url: str) -> dict[str, Any]:
    """The Job manifest the kubernetes worker would submit, validated as Kubernetes (strict)."""
    import copy

    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((INFRA / "work-pools" / template_name).read_text())
    cfg = _render(KubernetesWorkerJobConfiguration, template, values, api_url)
    cfg.prepare_for_flow_run(_flow_run())
    job = cfg.job_manifest
    kubernetes_validate.validate(job, K8S_VERSION, strict=False)
    # prefect-kubernetes insists on completions/parallelism inside the pod spec (its own
    # manifest check); the API server drops them. Everything else must be strictly valid.
    strict = copy.deepcopy(job)
    pod = strict["spec"]["template"]["spec"]
    assert pod.pop("completions") == 1 and pod.pop("parallelism") == 1
    kubernetes_validate.validate(strict, K8S_VERSION, strict=True)
    return job


def test_kubernetes_gpu_template_renders_a_valid_job(prefect_server) -> None:
    pool, job_vars = _pool_vars("kubernetes", "finetune")
    assert pool == "vitpipe-k8s-gpu"
    job = _k8s_job("kubernetes.json", {**job_vars, "env": {"EXTRA": "1"}}, prefect_server.api_url)
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "vitpipe:0.1.0"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["EXTRA"] == "1" and env["PREFECT__FLOW_RUN_ID"]
    refs = {next(iter(x.values()))["name"] for x in c["envFrom"]}
    assert refs == {"vitpipe-config", "vitpipe-secrets"}
    # CPU stages: no GPUs, same backoffLimit.
    _, cpu_vars = _pool_vars("kubernetes", "shard")
    cpu = _k8s_job("kubernetes.json", cpu_vars, prefect_server.api_url)
    assert int(cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"]) == 0
    assert cpu["spec"]["backoffLimit"] == 0


def test_kubernetes_multinode_template_is_an_indexed_job(prefect_server) -> None:
    pool, job_vars = _pool_vars("kubernetes-multinode", "finetune")
    assert pool == "vitpipe-k8s-multinode"
    job = _k8s_job("kubernetes-multinode.json", job_vars, prefect_server.api_url)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == job_vars["num_machines"] == 2
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "vitpipe-train"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["VITPIPE_MULTINODE"]["value"] == "1"
    assert env["VITPIPE_MAIN_PROCESS_IP"]["value"] == "$(VITPIPE_JOB_NAME)-0.vitpipe-train"
    # The headless Service that gives rank 0 its DNS name selects exactly these pods.
    svc = next(d for d in yaml.safe_load_all((INFRA / "k8s" / "storage.yaml").read_text())
               if d and d["kind"] == "Service")
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())


# ------------------------------------------------------------------------------ prefect.yaml
def test_prefect_yaml_declares_every_stage_on_every_pool_kind() -> None:
    from flows.stages import STAGE_FLOWS

    deps = _prefect_yaml()["deployments"]
    flows = {*STAGE_FLOWS, "pipeline", "score"}
    for kind in ("process", "docker", "kubernetes"):
        have = {d["entrypoint"].split(":")[1] for d in deps if d["name"] == kind}
        assert have == flows, f"{kind}: {sorted(flows - have)} missing"
    for d in deps:
        assert d["work_pool"]["name"] in POOLS, d["work_pool"]["name"]
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).exists()
    for d in (d for d in deps if d["entrypoint"].endswith(":pipeline")):
        assert d["schedules"][0]["cron"] == "0 3 * * 1"
        assert d["schedules"][0]["parameters"]["preset"].startswith("configs/")
