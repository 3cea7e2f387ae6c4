#!/usr/bin/env bash
# Make a Docker engine, a local base image and an offline wheelhouse available for the compose tests.
#
#   bash .ci/docker-setup.sh        # idempotent; the first run takes minutes, later runs seconds
#
# 1. Installs Debian's docker.io, docker-compose (v1) and debootstrap if missing (needs root).
# 2. Starts dockerd in the background unless `docker info` already works, and waits for it.
# 3. Builds a Debian bookworm minbase image with debootstrap ONCE (no registry is reachable here) and
#    caches its tarball, so a wiped engine re-imports it in seconds.
# 4. Builds the wheelhouse for docker/requirements.txt on the host ONCE (pip inside containers cannot
#    verify PyPI here) into a cache outside the repo, and hard-links it into docker/wheelhouse/
#    (git-ignored) so `docker build` installs offline.
#
# On success it prints what it made ready (tests/test_compose.py finds the base image by itself), e.g.
#   FL_BASE_IMAGE=fl-dp/bookworm-minbase:latest
# Variables: FL_DOCKER_CACHE (default /var/cache/fl-dp: base tarball, wheelhouse), FL_BASE_IMAGE (the tag
# to build/import), FL_DEBIAN_MIRROR, FL_DOCKERD_LOG.
# Exit code non-zero when any step fails (the caller then skips or fails the compose tests).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FL_DOCKER_CACHE:-/var/cache/fl-dp}"
BASE_IMAGE="${FL_BASE_IMAGE:-fl-dp/bookworm-minbase:latest}"
MIRROR="${FL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELHOUSE="$CACHE/wheelhouse"
REQUIREMENTS="$REPO/docker/requirements.txt"
DOCKERD_LOG="${FL_DOCKERD_LOG:-/var/log/fl-dp-dockerd.log}"

log() { printf '[docker-setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mkdir -p "$CACHE"

# --- 1. packages ------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" iptables >/dev/null
fi

# --- 2. engine --------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (log: $DOCKERD_LOG)"
    # A machine handed back after its session ended may keep a pid file of a dockerd that is gone.
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        rm -f /var/run/docker.pid /run/docker/containerd/containerd.pid
    fi
    # containerd is started by dockerd itself when it is not running as a service.
    nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        log "dockerd did not come up within 120 s; last lines of $DOCKERD_LOG:"
        tail -n 30 "$DOCKERD_LOG" >&2 || true
        exit 1
    fi
fi
log "engine: $(docker info --format '{{.ServerVersion}} storage={{.Driver}}')"

# --- 3. base image ----------------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE present"
else
    TARBALL="$CACHE/bookworm-minbase.tar"
    if [[ ! -s "$TARBALL" ]]; then
        log "debootstrap bookworm minbase from $MIRROR (a few minutes, once)"
        ROOTFS="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        trap 'rm -rf "$ROOTFS"' EXIT
        debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
            tail -n 30 "$CACHE/debootstrap.log" >&2
            exit 1
        }
        # Containers reach the mirror over plain http; drop the downloaded .debs.
        echo "deb $MIRROR bookworm main" >"$ROOTFS/etc/apt/sources.list"
        rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
        tar -C "$ROOTFS" -cf "$TARBALL.tmp" .
        mv "$TARBALL.tmp" "$TARBALL"
        rm -rf "$ROOTFS"
        trap - EXIT
    fi
    log "importing $TARBALL as $BASE_IMAGE"
    docker import "$TARBALL" "$BASE_IMAGE" >/dev/null
fi

# --- 4. wheelhouse ----------------------------------------------------------------------------
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ -f "$WHEELHOUSE/.complete" && "$(cat "$WHEELHOUSE/.complete")" == "$want" ]]; then
    log "wheelhouse $WHEELHOUSE complete ($(ls "$WHEELHOUSE" | grep -c '\.whl$') wheels)"
else
    PY="$REPO/.venv/bin/python"
    [[ -x "$PY" ]] || PY="$(command -v python3)"
    log "building wheelhouse with $PY (once; ~1-2 min)"
    rm -rf "$WHEELHOUSE.tmp"
    mkdir -p "$WHEELHOUSE.tmp"
    # `pip wheel` (not `pip download`) so any sdist becomes a wheel and the image needs no build tools.
    "$PY" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE.tmp" -r "$REQUIREMENTS"
    echo "$want" >"$WHEELHOUSE.tmp/.complete"
    rm -rf "$WHEELHOUSE"
    mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
    log "wheelhouse: $(ls "$WHEELHOUSE" | grep -c '\.whl$') wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
fi

# Into the build context (git-ignored docker/wheelhouse/). Hard links when on the same filesystem.
STAGED="$REPO/docker/wheelhouse"
if [[ ! -f "$STAGED/.complete" || "$(cat "$STAGED/.complete")" != "$want" ]]; then
    rm -rf "$STAGED"
    cp -al "$WHEELHOUSE" "$STAGED" 2>/dev/null || cp -a "$WHEELHOUSE" "$STAGED"
    log "staged the wheelhouse in $STAGED"
fi

echo "FL_BASE_IMAGE=$BASE_IMAGE"
echo "FL_WHEELHOUSE=$STAGED"
