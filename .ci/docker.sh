#!/usr/bin/env bash
# The Docker part of CI: a local engine, started and stopped by this script.
#   bash .ci/docker.sh start   install docker.io + debootstrap if missing, start dockerd, make
#                              the local base image (idempotent: safe to call twice)
#   eval "$(bash .ci/docker.sh env)"   DOCKER_HOST and friends for tests/test_docker_run.py
#   bash .ci/docker.sh stop    stop the engine (by its PID); image layers stay cached
# Needs root (dockerd, debootstrap). tests/test_docker_run.py fails under CI=true when the
# engine is not reachable, so a broken start cannot pass as a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=docker/ci/engine.sh

install_tools() {
  local missing=()
  [[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  ((${#missing[@]})) || return 0
  echo "[ci/docker] apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The CPU torch wheel, if this machine has one in a find-links folder: the image build takes it
# from docker/wheels/ instead of PyTorch's index (which CI cannot reach).
torch_wheel() {
  local ver d
  ver=$(python3 -m train info pin torch)  # the package reads the pin (standard library only)
  for d in ${PIP_FIND_LINKS:-} /opt/wheels; do
    compgen -G "$d/torch-$ver+cpu-*.whl" | head -1 && return 0
  done
  return 0
}

case ${1:-} in
  start)
    install_tools
    "$ENGINE" start
    "$ENGINE" base ;;
  stop)
    # Old builds' untagged images would pile up in the kept data root; layer caches stay.
    eval "$("$ENGINE" env)"
    /usr/bin/docker image prune -f >/dev/null 2>&1 || true
    "$ENGINE" stop ;;
  env)
    "$ENGINE" env
    echo "export DOCKER=/usr/bin/docker TRAINER_LOCAL_BASE=${LOCAL_BASE:-localbase:bookworm}"
    wheel=$(torch_wheel)
    [[ -n $wheel ]] && echo "export TORCH_WHEEL=$wheel"
    true ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
