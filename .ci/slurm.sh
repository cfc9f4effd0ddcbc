#!/usr/bin/env bash
# The Slurm part of CI: Debian's slurm-wlm and munge, installed if missing (needs root).
# tests/test_slurm.py starts and stops its own munged, slurmctld and slurmd (config in a temp dir),
# and fails under CI=true when they cannot run, so a broken install cannot pass as a skip.
set -euo pipefail
missing=()
[[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/bin/sbatch ]] || missing+=(slurm-wlm)
[[ -x /usr/sbin/munged && -x /usr/sbin/mungekey ]] || missing+=(munge)
((${#missing[@]})) || exit 0
echo "[ci/slurm] apt-get install ${missing[*]}" >&2
apt-get update -qq
# policy-rc.d or no systemd: the packages' services are not started, which is what we want.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
