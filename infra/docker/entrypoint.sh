#!/bin/sh
# vitpipe container entrypoint.
# 1. Flow-run containers started by a docker worker do not inherit the worker's environment:
#    the worker writes endpoints and credentials to a 0600 env file on the shared work volume
#    (infra/docker/worker.sh) and every container sources it here. Nothing is in the image.
# 2. Multi-node training (Kubernetes indexed Job, VITPIPE_MULTINODE=1): pod 0 runs the Prefect
#    flow run it was given; pods 1..N-1 join that run's `accelerate launch` rendezvous.
set -eu
env_file="${VITPIPE_ENV_FILE:-/var/lib/vitpipe/secrets/vitpipe.env}"
if [ -r "$env_file" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
fi
if [ "${VITPIPE_MULTINODE:-0}" = "1" ] && [ "${JOB_COMPLETION_INDEX:-0}" != "0" ]; then
    exec python -m flows.launch follow
fi
exec "$@"
