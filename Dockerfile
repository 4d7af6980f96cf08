# syntax=docker/dockerfile:1
# vitpipe image: flow runs (every stage), Prefect workers and `vitpipe` commands.
# CUDA-capable: torch==2.14.1 from PyPI bundles its CUDA 13 runtime (pinned nvidia-* wheels in
# infra/docker/requirements.lock); GPUs come from the NVIDIA container runtime at run time
# (compose `gpus`/device_requests, Kubernetes nvidia.com/gpu). No secrets are baked in: they
# arrive as environment variables (infra/.env, Kubernetes Secret).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vitpipe ./vitpipe
COPY flows ./flows
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITPIPE_HOME=/opt/vitpipe \
    PREFECT_HOME=/var/lib/vitpipe/prefect \
    PREFECT_LOCAL_STORAGE_PATH=/var/lib/vitpipe/prefect-results \
    MPLCONFIGDIR=/tmp/matplotlib \
    TQDM_DISABLE=1
COPY infra/docker/requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -r /tmp/requirements.lock
COPY --from=build /dist /tmp/dist
RUN pip install --no-cache-dir --no-deps /tmp/dist/vitpipe-0.1.0-py3-none-any.whl \
    && rm -rf /tmp/dist /tmp/requirements.lock \
    && groupadd --gid 10001 vitpipe \
    && useradd --uid 10001 --gid vitpipe --create-home --shell /usr/sbin/nologin vitpipe \
    && mkdir -p /var/lib/vitpipe /opt/vitpipe \
    && chown -R vitpipe:vitpipe /var/lib/vitpipe /opt/vitpipe
WORKDIR /opt/vitpipe
# Deployment entrypoints (flows/stages.py:shard ...) are loaded from this directory.
COPY --chown=vitpipe:vitpipe flows ./flows
COPY --chown=vitpipe:vitpipe configs ./configs
COPY --chown=vitpipe:vitpipe prefect.yaml ./prefect.yaml
COPY --chown=vitpipe:vitpipe infra/work-pools/*.json ./infra/work-pools/
COPY --chown=vitpipe:vitpipe --chmod=0755 infra/docker/worker.sh ./infra/docker/worker.sh
COPY --chown=vitpipe:vitpipe --chmod=0755 infra/docker/entrypoint.sh /usr/local/bin/vitpipe-entrypoint
USER 10001:10001
VOLUME ["/var/lib/vitpipe"]
# Prefect workers pass their own command (`prefect flow-run execute`); the entrypoint only
# routes non-zero ranks of a multi-node Kubernetes job to `python -m flows.launch follow`.
ENTRYPOINT ["/usr/local/bin/vitpipe-entrypoint"]
CMD ["vitpipe", "--help"]
