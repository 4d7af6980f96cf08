#!/usr/bin/env bash
# Build the vitpipe image on a machine with no image registry, from nothing:
#   1. install docker.io (and debootstrap) with apt-get if dockerd is missing,
#   2. start dockerd if no daemon answers (no iptables, no bridge: containers use the host network),
#   3. make a Debian base image with python3 once (debootstrap + `docker import`; cached),
#   4. serve pip's local indexes (file:// ones from `pip config list`) on 127.0.0.1 and
#      `docker build` the Dockerfile with BASE_IMAGE and PIP_EXTRA_INDEX_URL build arguments.
# Each step prints how long it took. With a registry (a user's CI) none of this is needed:
#   docker build -t vitpipe:0.1.0 .
# Usage: infra/docker/build-local.sh [image tag]   (env: BASE_IMAGE, DEBIAN_MIRROR, SUITE)
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG="${1:-vitpipe:0.1.0}"
SUITE="${SUITE:-bookworm}"
BASE_IMAGE="${BASE_IMAGE:-vitpipe-base:$SUITE}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
LOG_DIR="${VITPIPE_DOCKER_LOG_DIR:-/var/log}"
step_start=0
step() { step_start=$(date +%s); echo "== $*"; }
took() { echo "   done in $(( $(date +%s) - step_start ))s"; }

step "docker engine"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io debootstrap >/dev/null
fi
took

step "docker daemon"
if ! $SUDO docker info >/dev/null 2>&1; then
    # --bridge=none/--iptables=false: works where the kernel or sandbox has no netfilter;
    # containers then run with --network host (the vitpipe pools set network_mode: host).
    $SUDO sh -c "nohup dockerd --iptables=false --ip6tables=false --bridge=none \
        >'$LOG_DIR/vitpipe-dockerd.log' 2>&1 &"
    for _ in $(seq 1 60); do $SUDO docker info >/dev/null 2>&1 && break; sleep 1; done
    $SUDO docker info >/dev/null 2>&1 || {
        echo "dockerd did not start; see $LOG_DIR/vitpipe-dockerd.log:" >&2
        tail -20 "$LOG_DIR/vitpipe-dockerd.log" >&2; exit 1; }
fi
took

step "base image $BASE_IMAGE"
if ! $SUDO docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ "$BASE_IMAGE" != vitpipe-base:* ]]; then
        $SUDO docker pull "$BASE_IMAGE"
    else
        mirror="${DEBIAN_MIRROR:-$(grep -rhoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources \
            2>/dev/null | awk '{print $2}' | grep -v security | head -1)}"
        mirror="${mirror:-http://deb.debian.org/debian}"
        rootfs="$(mktemp -d)"
        trap '$SUDO rm -rf "$rootfs"' EXIT
        $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >/dev/null
        # this machine's extra CAs (a TLS-intercepting egress proxy): the build's pip needs them
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            $SUDO cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            $SUDO chroot "$rootfs" update-ca-certificates >/dev/null
        fi
        $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        $SUDO tar -C "$rootfs" -c . | $SUDO docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    fi
fi
took

step "package indexes"
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
servers=()
cleanup_servers() { for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'cleanup_servers; [ -n "${rootfs:-}" ] && $SUDO rm -rf "$rootfs"' EXIT
PY="${PYTHON:-python3}"
extra=()
# pip's file:// indexes and find-links folders, served over HTTP so the build can reach them
mapfile -t dirs < <("$PY" -m pip config list 2>/dev/null \
    | grep -E '(extra-index-url|index-url|find-links)=' | cut -d= -f2- | tr -d "'" \
    | tr ' ' '\n' | sed -n 's#^file://##p; s#^\(/.*\)#\1#p' | sort -u)
for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    # the same port for the same folder on every build: the URL is a build argument, and a
    # changed one would invalidate the cached torch layer
    port=$("$PY" -c 'import socket, sys, zlib
base = 30000 + zlib.crc32(sys.argv[1].encode()) % 5000
for p in range(base, base + 50):
    try:
        socket.create_server(("127.0.0.1", p)).close(); print(p); break
    except OSError:
        pass' "$d")
    if [[ "$d" == */simple ]]; then  # its pages link ../../files/: serve the parent
        "$PY" -m http.server "$port" --bind 127.0.0.1 --directory "${d%/simple}" >/dev/null 2>&1 &
        extra+=("http://127.0.0.1:$port/simple/")
    else
        "$PY" -m http.server "$port" --bind 127.0.0.1 --directory "$d" >/dev/null 2>&1 &
        build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
    fi
    servers+=($!)
done
if [ ${#extra[@]} -gt 0 ]; then
    build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra[*]}" \
                 --build-arg "PIP_TRUSTED_HOST=127.0.0.1")
fi
for u in "${extra[@]}"; do  # each server answers before the build starts
    "$PY" -c 'import sys, time, urllib.request
for _ in range(40):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2); break
    except OSError:
        time.sleep(0.25)' "$u"
done
echo "   ${#servers[@]} local index(es) served: ${extra[*]:-none}"
took

step "docker build $TAG"
build_log="$(mktemp)"
# the classic builder: BuildKit would fetch its Dockerfile frontend from a registry
if ! DOCKER_BUILDKIT=0 $SUDO docker build --network host "${build_args[@]}" -t "$TAG" . \
        >"$build_log" 2>&1; then
    tail -40 "$build_log" >&2; echo "docker build failed (log: $build_log)" >&2; exit 1
fi
grep -E '^(Step |Successfully (built|tagged))' "$build_log" | sed 's/^/   /'; rm -f "$build_log"
took
$SUDO docker image inspect "$TAG" --format '   image {{.RepoTags}} {{.Size}} bytes'
