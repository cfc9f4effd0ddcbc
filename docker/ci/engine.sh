#!/usr/bin/env bash
# A throw-away Docker engine for CI and for machines without a Docker service, plus the local
# base image the CPU flavour builds on when no registry can be reached.
#
#   docker/ci/engine.sh start    start dockerd (idempotent) and wait until it answers
#   docker/ci/engine.sh base     make $LOCAL_BASE from debootstrap (idempotent)
#   docker/ci/engine.sh stop     stop the dockerd this script started (by its PID)
#   docker/ci/engine.sh status   exit 0 if the engine answers
#   docker/ci/engine.sh env      print the variables a client needs (eval "$(... env)")
#
# Settings (environment): DOCKER_CI_ROOT (state: data, socket, pid, log), LOCAL_BASE (tag),
# DEBIAN_MIRROR. The data root is kept between runs so layer caches survive; `stop --purge`
# removes it.
set -euo pipefail

ROOT=${DOCKER_CI_ROOT:-/var/lib/train-docker-ci}
SOCK=$ROOT/docker.sock
PIDFILE=$ROOT/dockerd.pid
LOG=$ROOT/dockerd.log
LOCAL_BASE=${LOCAL_BASE:-localbase:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Debian's client (20.10) builds with BuildKit; a newer client without buildx would fall back
# to the legacy builder, where `RUN --mount` fails.
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=1

log() { echo "[engine] $*" >&2; }

answers() { timeout 10 "$DOCKER" version >/dev/null 2>&1; }

start() {
  if answers; then log "engine already running at $DOCKER_HOST"; return; fi
  command -v dockerd >/dev/null || { log "dockerd not found: apt-get install docker.io"; exit 1; }
  mkdir -p "$ROOT/data" "$ROOT/exec"
  # No iptables/bridge: the sandbox has no netfilter; builds and runs use --network host.
  # overlay2, not vfs: vfs copies every layer in full (7.9 GB for 1.6 GB of images).
  setsid dockerd --storage-driver overlay2 --iptables=false --ip6tables=false --bridge=none \
    --data-root "$ROOT/data" --exec-root "$ROOT/exec" --pidfile "$PIDFILE" \
    -H "$DOCKER_HOST" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    if answers; then log "engine up at $DOCKER_HOST (log: $LOG)"; return; fi
    sleep 0.5
  done
  log "dockerd did not answer within 30 s; last log lines:"; tail -20 "$LOG" >&2; exit 1
}

stop() {
  if [[ -f $PIDFILE ]]; then
    local pid; pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && { log "dockerd $pid ignored SIGTERM; killing"; kill -9 "$pid"; }
      log "engine stopped (pid $pid)"
    fi
    rm -f "$PIDFILE"
  fi
  if [[ ${1:-} == --purge ]]; then
    # overlay mounts may outlive dockerd briefly; unmount before deleting.
    grep -o "$ROOT/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$ROOT"; log "removed $ROOT"
  fi
}

base() {
  if "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then log "$LOCAL_BASE exists"; return; fi
  command -v debootstrap >/dev/null || { log "debootstrap not found: apt-get install debootstrap"; exit 1; }
  local rootfs; rootfs=$(mktemp -d "$ROOT/rootfs.XXXXXX")
  log "debootstrap bookworm into $rootfs (about 40 s)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$ROOT/debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
  # Outbound HTTPS from this machine goes through its own CA: trust what the host trusts, so
  # pip and apt inside builds verify certificates instead of turning verification off.
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
  log "imported $LOCAL_BASE"
}

case ${1:-} in
  start) start ;;
  stop) shift; stop "$@" ;;
  base) base ;;
  status) answers ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST DOCKER_BUILDKIT=1" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
