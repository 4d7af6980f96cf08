"""Write vitpipe's work-pool base job templates, derived from the workers' own defaults.

    python infra/work-pools/build.py        # rewrites docker.json, kubernetes*.json here

Each template is the installed worker's default base job template plus what training needs:
- docker: the vitpipe image, GPUs through ``container_create_kwargs.device_requests`` (the
  Docker pool has no NVIDIA-runtime field), a large /dev/shm for loader workers, the shared
  work volume, the compose network.
- kubernetes: ``nvidia.com/gpu`` limits, node selector and tolerations, config and secrets from
  a ConfigMap/Secret (``envFrom``), the shared work volume, ``backoffLimit: 0`` fixed (a
  retried pod would re-run a flow run Prefect already marked Crashed).
- kubernetes-multinode: the same as an Indexed Job of ``num_machines`` pods; pod 0 runs the flow,
  the others run ``python -m flows.launch follow`` (see infra/docker/entrypoint.sh) and reach
  rank 0 at ``<job>-0.vitpipe-train`` through the headless Service in infra/k8s.
``tests/test_infra.py`` renders these with the workers' job-configuration classes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
IMAGE = "vitpipe:0.1.0"
WORK_MOUNT = "/var/lib/vitpipe"


def _var(schema: dict[str, Any], title: str, description: str) -> dict[str, Any]:
    return {"title": title, "description": description, **schema}


def docker_template(gpu: bool = False) -> dict[str, Any]:
    """``gpu``: the training pool's template (docker-gpu.json): all the host's GPUs by default."""
    from prefect_docker.worker import DockerWorker

    t = copy.deepcopy(DockerWorker.get_default_base_job_template())
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    # the shared work volume (results, secrets file) and the host's datasets (read-only)
    props["volumes"]["default"] = [f"vitpipe-work:{WORK_MOUNT}", "/data:/data:ro"]
    props["networks"]["default"] = ["vitpipe"]
    props["auto_remove"]["default"] = True
    gpus = [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}] if gpu else []
    props["device_requests"] = _var(
        {"type": "array", "items": {"type": "object"}, "default": gpus},
        "GPU device requests",
        "docker-py DeviceRequest dicts, e.g. [{driver: nvidia, count: -1, "
        "capabilities: [[gpu]]}] for all GPUs; [] for CPU stages",
    )
    props["shm_size"] = _var({"type": "string", "default": "16g" if gpu else "8g"}, "Shared memory",
                             "/dev/shm size (DataLoader workers share batches through it)")
    t["job_configuration"]["container_create_kwargs"] = {
        "device_requests": "{{ device_requests }}",
        "shm_size": "{{ shm_size }}",
    }
    return t


def kubernetes_template(multinode: bool = False) -> dict[str, Any]:
    from prefect_kubernetes.worker import KubernetesWorker

    t = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    props["image_pull_policy"]["default"] = "IfNotPresent"
    props["namespace"]["default"] = "vitpipe"
    props["service_account_name"]["default"] = "vitpipe-flow-runner"
    props.pop("backoff_limit", None)
    props["gpus"] = _var({"type": "integer", "minimum": 0, "default": 0}, "GPUs",
                         "nvidia.com/gpu limit per pod (GPUs per machine)")
    props["node_selector"] = _var({"type": "object", "additionalProperties": {"type": "string"},
                                   "default": {}}, "Node selector",
                                  "e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}")
    props["tolerations"] = _var({"type": "array", "items": {"type": "object"}, "default": []},
                                "Tolerations", "e.g. [{key: nvidia.com/gpu, operator: Exists,"
                                " effect: NoSchedule}]")
    props["config_map"] = _var({"type": "string", "default": "vitpipe-config"}, "ConfigMap",
                               "endpoints (MLflow, S3, Prefect) as environment variables")
    props["secret_name"] = _var({"type": "string", "default": "vitpipe-secrets"}, "Secret",
                                "S3 credentials and other secrets as environment variables")
    props["work_volume_claim"] = _var({"type": "string", "default": "vitpipe-work"},
                                      "Work volume claim",
                                      f"RWX PVC mounted at {WORK_MOUNT} (results, outputs)")
    props["shm_size"] = _var({"type": "string", "default": "8Gi"}, "Shared memory",
                             "/dev/shm size limit (memory-backed emptyDir)")
    for k in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
        props.setdefault(k, {"type": "string"})

    job = t["job_configuration"]["job_manifest"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    # prefect-kubernetes' manifest check requires completions/parallelism in the *pod* spec
    # (its default template has them there); Kubernetes drops them. The Job-level ones count.
    spec["backoffLimit"] = 0
    spec["completions"] = 1
    spec["parallelism"] = 1
    spec["template"]["metadata"] = {"labels": {"app.kubernetes.io/part-of": "vitpipe"}}
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["volumes"] = [
        {"name": "work", "persistentVolumeClaim": {"claimName": "{{ work_volume_claim }}"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}},
    ]
    c = pod["containers"][0]
    c["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    c["envFrom"] = [{"configMapRef": {"name": "{{ config_map }}"}},
                    {"secretRef": {"name": "{{ secret_name }}"}}]
    c["volumeMounts"] = [{"name": "work", "mountPath": WORK_MOUNT},
                         {"name": "dshm", "mountPath": "/dev/shm"}]
    if multinode:
        props["num_machines"] = _var({"type": "integer", "minimum": 2, "default": 2},
                                     "Machines", "pods in the indexed Job (one rank group each)")
        spec["completionMode"] = "Indexed"
        spec["completions"] = "{{ num_machines }}"
        spec["parallelism"] = "{{ num_machines }}"
        spec["template"]["metadata"]["labels"]["vitpipe/multinode"] = "true"
        pod["subdomain"] = "vitpipe-train"  # headless Service: <job>-<index>.vitpipe-train
        c["env"] = [
            {"name": "VITPIPE_MULTINODE", "value": "1"},
            {"name": "VITPIPE_JOB_NAME", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
            {"name": "VITPIPE_MAIN_PROCESS_IP", "value": "$(VITPIPE_JOB_NAME)-0.vitpipe-train"},
        ]
        # launch.main_process_port must match (default 29500); launch.num_machines must equal
        # num_machines: the pipeline passes it as a job variable (orchestration.job_variables).
        c["ports"] = [{"containerPort": 29500, "name": "rendezvous"}]
    return t


def main() -> None:
    for name, tmpl in (("docker.json", docker_template()),
                       ("docker-gpu.json", docker_template(gpu=True)),
                       ("kubernetes.json", kubernetes_template()),
                       ("kubernetes-multinode.json", kubernetes_template(multinode=True))):
        (HERE / name).write_text(json.dumps(tmpl, indent=2) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
