#!/usr/bin/env bash
# Run N training processes on this machine, each with its own simulated CPU devices, to test
# the multi-host code path (jax.distributed, per-process data shards, collective checkpoints).
#
# Usage (from anywhere; relative paths are taken from the repository root):
#   bash launch/local_multiprocess.sh [extra flags, e.g. --config.train.total_steps=20]
#
# Environment (all optional):
#   NUM_PROCESSES        number of processes              (default 2)
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 4)
#   CONFIG               config file[:args]                (default configs/tiny_roi.py)
#   WORKDIR              run directory                     (default runs/local_multiprocess)
#   PORT                 coordinator port on 127.0.0.1     (default 12355)
#   PYTHON               interpreter                       (default python)
#
# Logs: $WORKDIR/logs/process_<i>.log. The exit status is the first non-zero one of the
# processes (the others are then stopped), or 0. Ctrl-C / SIGTERM sends SIGTERM to every
# process; the trainer then saves a checkpoint before it exits.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
CONFIG=${CONFIG:-configs/tiny_roi.py}
WORKDIR=${WORKDIR:-runs/local_multiprocess}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$WORKDIR/logs"

pids=()

stop_all() {  # SIGTERM every process still running, then reap them
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}

# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  trap - INT TERM
  echo "interrupted: stopping ${#pids[@]} processes" >&2
  stop_all
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap stop_all EXIT  # also covers a failure of this script while launching

for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$WORKDIR/logs/process_$i.log"
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m region_medclip.main \
      --config="$CONFIG" \
      --workdir="$WORKDIR" \
      --multiprocess \
      --coordinator_address="127.0.0.1:$PORT" \
      --num_processes="$NUM_PROCESSES" \
      --process_id="$i" \
      "$@" >"$log" 2>&1 &
  pids+=("$!")
  echo "process $i: pid $!, log $log"
done

# Poll rather than `wait -n` (works with bash 3.2). A process that fails leaves the others
# blocked in collectives, so the first failure stops the rest.
status=0
declare -a finished=()
remaining=$NUM_PROCESSES
while ((remaining > 0 && status == 0)); do
  for i in "${!pids[@]}"; do
    if [[ -n ${finished[i]:-} ]] || kill -0 "${pids[i]}" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "${pids[i]}" || rc=$?
    finished[i]=1
    remaining=$((remaining - 1))
    if ((rc == 0)); then
      echo "process $i finished"
    else
      echo "process $i exited with status $rc; last lines of $WORKDIR/logs/process_$i.log:" >&2
      tail -n 20 "$WORKDIR/logs/process_$i.log" >&2 || true
      status=$rc
      break
    fi
  done
  if ((remaining > 0 && status == 0)); then
    sleep 1
  fi
done

if ((status != 0 && remaining > 0)); then
  echo "stopping the other $remaining processes" >&2
  stop_all
fi
trap - EXIT
exit "$status"
