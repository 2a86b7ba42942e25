#!/usr/bin/env bash
# Stop the single-node SLURM cluster that launchers/slurm/up.sh started in $PCPO_SLURM_DIR
# (default /tmp/pcpo-slurm): its jobs, then slurmd, slurmctld and munged, each by its pid file.
# Running it again, or on a cluster that is not up, does nothing. The directory (config, state,
# logs) is kept for inspection; remove it by hand to start from nothing.
set -euo pipefail

dir="${PCPO_SLURM_DIR:-/tmp/pcpo-slurm}"
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launchers/slurm/common.sh
source "$here/common.sh"
export SLURM_CONF="$dir/slurm.conf"

# Jobs first: slurmstepd outlives slurmd by design, so a job left running would keep its
# processes after the daemons are gone.
if alive slurmctld && alive slurmd; then
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

# All three at once: each takes a second or two to wind down, and none needs the others for it.
declare -A pids=()
for daemon in slurmd slurmctld munged; do
    pid="$(daemon_pid "$daemon")" || continue
    say "stopping $daemon (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids[$daemon]="$pid"
done
for daemon in "${!pids[@]}"; do
    pid="${pids[$daemon]}"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    # Ten seconds is far more than a clean shutdown takes; a daemon still there is stuck.
    if kill -0 "$pid" 2>/dev/null; then
        say "$daemon did not stop on SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/run/$daemon.pid"
done
