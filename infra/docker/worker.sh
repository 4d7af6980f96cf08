#!/bin/sh
# Start a Prefect docker worker after sharing its endpoints and credentials with the flow-run
# containers it will start (0600 file on the shared work volume, owned by the image's user).
# Usage: worker.sh <pool> [extra `prefect worker start` args]
set -eu
pool="$1"; shift
dir=/var/lib/vitpipe/secrets
mkdir -p "$dir"
umask 077
env | grep -E '^(AWS_|MLFLOW_|PREFECT_API_URL=|PREFECT_LOCAL_STORAGE_PATH=|VITPIPE_)' \
    | sed 's/^\([^=]*\)=\(.*\)$/\1='"'"'\2'"'"'/' > "$dir/vitpipe.env"
chown -R 10001:10001 "$dir" /var/lib/vitpipe
case "$pool" in
    *-gpu) template=docker-gpu.json ;;  # all GPUs by default (device_requests)
    *) template=docker.json ;;
esac
exec prefect worker start --pool "$pool" --type docker \
    --base-job-template "/opt/vitpipe/infra/work-pools/$template" --install-policy never "$@"
