"""Docker work pools for the local stack: ``vitpipe stack up --docker``.

Every stage's flow run then runs in its own container of the vitpipe image, started by a
Prefect docker worker (prefect-docker) on the host. What the containers share is what a cluster
would share: the servers (Prefect API, MLflow, S3) over the network and one named volume
(``/var/lib/vitpipe``: Prefect results, the endpoints/credentials file the entrypoint reads).
Containers use the host's network (the daemon may run without a bridge; the servers listen on
127.0.0.1). Credentials never enter the pools' templates (the Prefect database): they are
written once into the volume, 0600 and owned by the image's user, as infra/docker/worker.sh does
under compose.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

IMAGE = "vitpipe:0.1.0"
VOLUME = "vitpipe-work"
WORK_MOUNT = "/var/lib/vitpipe"
SECRETS = f"{WORK_MOUNT}/secrets/vitpipe.env"
DOCKER_POOLS = ("vitpipe-docker", "vitpipe-docker-gpu")
BUILD_HINT = "infra/docker/build-local.sh (installs Docker, starts dockerd, builds the image)"


class DockerUnavailable(RuntimeError):
    """No Docker daemon or no image: the message says what to run."""


def _docker(*args: str, input: str | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("docker")
    if exe is None:
        raise DockerUnavailable(f"no `docker` command on PATH; run {BUILD_HINT}")
    res = subprocess.run([exe, *args], input=input, capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise DockerUnavailable(f"docker {' '.join(args[:2])} failed: "
                                f"{(res.stderr or res.stdout).strip()[-600:]}")
    return res


def check_docker(image: str = IMAGE) -> None:
    """The daemon answers and ``image`` exists, else :class:`DockerUnavailable`."""
    info = _docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if info.returncode != 0:
        raise DockerUnavailable(f"no Docker daemon answers ({info.stderr.strip()[-300:]}); "
                                f"run {BUILD_HINT}")
    if _docker("image", "inspect", image, check=False).returncode != 0:
        raise DockerUnavailable(f"no image {image}; build it with {BUILD_HINT}")


def host_has_gpus() -> bool:
    nvsmi = shutil.which("nvidia-smi")
    if nvsmi is None:
        return False
    res = subprocess.run([nvsmi, "-L"], capture_output=True, text=True, timeout=30)
    return res.returncode == 0 and "GPU" in res.stdout


def write_secrets(env: dict[str, str], volume: str = VOLUME, image: str = IMAGE) -> None:
    """Create ``volume`` and write ``env`` into it as the containers' env file (0600)."""
    _docker("volume", "create", volume)
    body = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
    script = ("umask 077 && mkdir -p /var/lib/vitpipe/secrets && cat > " + SECRETS +
              " && chown -R 10001:10001 /var/lib/vitpipe")
    _docker("run", "--rm", "-i", "--user", "0", "--network", "none", "--entrypoint", "sh",
            "-v", f"{volume}:{WORK_MOUNT}", image, "-c", script, input=body)


def stack_template(base: dict[str, Any], volume: str = VOLUME, gpus: bool = True
                   ) -> dict[str, Any]:
    """A docker pool's base job template with this host's defaults: host network, the stack's
    work volume (other mounts whose host path exists are kept), no GPUs if the host has none."""
    t = copy.deepcopy(base)
    props = t["variables"]["properties"]
    props["network_mode"]["default"] = "host"
    props["networks"]["default"] = []
    vols = [f"{volume}:{WORK_MOUNT}"]
    for v in props["volumes"].get("default") or []:
        src, _, rest = v.partition(":")
        if not rest.startswith(WORK_MOUNT) and src.startswith("/") and Path(src).exists():
            vols.append(v)
    props["volumes"]["default"] = vols
    # The worker passes its own Prefect settings to every container under their canonical
    # names (PREFECT_RESULTS_LOCAL_STORAGE_PATH wins over the PREFECT_LOCAL_STORAGE_PATH alias),
    # and its paths are the host's. These are the image's own, on the shared volume, so a
    # parent pipeline reads its stages' results.
    results = f"{WORK_MOUNT}/prefect-results"
    props["env"]["default"] = {
        "PREFECT_HOME": f"{WORK_MOUNT}/prefect",
        "PREFECT_PROFILES_PATH": f"{WORK_MOUNT}/prefect/profiles.toml",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": results,
        "PREFECT_LOCAL_STORAGE_PATH": results,
    }
    if not gpus:
        props["device_requests"]["default"] = []
    return t


def remove_containers(worker_names: list[str]) -> list[str]:
    """Remove the flow-run containers these workers started (running or not)."""
    gone: list[str] = []
    if shutil.which("docker") is None:
        return gone
    for name in worker_names:
        res = _docker("ps", "-aq", "--filter", f"label=io.prefect.worker-name={name}",
                      check=False)
        ids = res.stdout.split()
        if ids:
            _docker("rm", "-f", *ids, check=False)
            gone += ids
    return gone
