# vitpipe image: flow runs (every stage), Prefect workers and `vitpipe` commands.
# CUDA-capable: torch==2.14.1 from PyPI bundles its CUDA 13 runtime (pinned nvidia-* wheels in
# infra/docker/requirements.lock); GPUs come from the NVIDIA container runtime at run time
# (compose `gpus`/device_requests, Kubernetes nvidia.com/gpu). No secrets are baked in: they
# arrive as environment variables or a mounted env file (infra/docker/entrypoint.sh).
#
#   docker build -t vitpipe:0.1.0 .                              # public base and index
#   infra/docker/build-local.sh                                  # no registry: debootstrap base
#   docker build --build-arg BASE_IMAGE=my.registry/python:3.11 \
#       --build-arg PIP_INDEX_URL=https://my.mirror/simple -t vitpipe:0.1.0 .
#
# Any base with python3.11 and its venv module works (python:3.11-slim, Debian bookworm with
# python3-venv). Layers: torch and its CUDA wheels, then the other pins, then the project, so
# a code change rebuilds only the last, small layers.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/build-venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vitpipe ./vitpipe
COPY flows ./flows
RUN /opt/build-venv/bin/pip wheel --no-deps --wheel-dir /dist .

FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VITPIPE_HOME=/opt/vitpipe \
    PREFECT_HOME=/var/lib/vitpipe/prefect \
    PREFECT_LOCAL_STORAGE_PATH=/var/lib/vitpipe/prefect-results \
    MPLCONFIGDIR=/tmp/matplotlib \
    TQDM_DISABLE=1
RUN python3 -m venv /opt/venv \
    && groupadd --gid 10001 vitpipe \
    && useradd --uid 10001 --gid vitpipe --create-home --shell /usr/sbin/nologin vitpipe \
    && mkdir -p /var/lib/vitpipe /opt/vitpipe \
    && chown -R vitpipe:vitpipe /var/lib/vitpipe /opt/vitpipe
# torch + CUDA wheels (~4 GB): their own layer, reused while the lock's other pins change
COPY infra/docker/requirements.lock /tmp/requirements.lock
RUN grep -E '^(torch|torchvision|triton|nvidia-|cuda-)' /tmp/requirements.lock > /tmp/torch.txt \
    && pip install -r /tmp/torch.txt && rm /tmp/torch.txt
RUN pip install -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY --from=build /dist /tmp/dist
RUN pip install --no-deps /tmp/dist/vitpipe-0.1.0-py3-none-any.whl && rm -rf /tmp/dist
WORKDIR /opt/vitpipe
# Deployment entrypoints (flows/stages.py:shard ...) are loaded from this directory.
COPY --chown=10001:10001 flows ./flows
COPY --chown=10001:10001 configs ./configs
COPY --chown=10001:10001 prefect.yaml ./prefect.yaml
COPY --chown=10001:10001 infra/work-pools/*.json ./infra/work-pools/
COPY --chown=10001:10001 infra/docker/worker.sh ./infra/docker/worker.sh
COPY infra/docker/entrypoint.sh /usr/local/bin/vitpipe-entrypoint
RUN chmod 0755 ./infra/docker/worker.sh /usr/local/bin/vitpipe-entrypoint
USER 10001:10001
VOLUME ["/var/lib/vitpipe"]
# Prefect workers pass their own command (`prefect flow-run execute`); the entrypoint reads
# the mounted env file and routes non-zero ranks of a multi-node Kubernetes job to
# `python -m flows.launch follow`.
ENTRYPOINT ["/usr/local/bin/vitpipe-entrypoint"]
CMD ["vitpipe", "--help"]
