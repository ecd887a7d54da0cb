#!/usr/bin/env bash
# Stop the Ray head started by cluster/local_start.sh -- only that one (never `ray stop`, which
# would stop every Ray on the machine).
#
#   cluster/local_stop.sh [STATE_FILE]        (default: runs/ray-local/cluster.env)
#
# Sends SIGTERM to the recorded `ray start --block` PID (it drains the node, <= 30 s, then shuts its
# GCS, raylet, dashboard and workers down), then SIGTERM and finally SIGKILL to what is left of its
# process group (the PID is the group id: the head was started with setsid).
set -euo pipefail

STATE="${1:-${SLIM_RAY_CLUSTER_STATE:-runs/ray-local/cluster.env}}"
[ -f "$STATE" ] || { echo "local_stop: no state file $STATE (nothing to stop)" >&2; exit 1; }
# shellcheck disable=SC1090
PID="$(. "$STATE"; echo "${RAY_HEAD_PID:-}")"
TEMP_DIR="$(. "$STATE"; echo "${RAY_TEMP_DIR:-}")"
WORKER_PIDS="$(. "$STATE"; echo "${RAY_WORKER_PIDS:-}")"
WORKER_TEMP_DIRS="$(. "$STATE"; echo "${RAY_WORKER_TEMP_DIRS:-}")"
[ -n "$PID" ] || { echo "local_stop: $STATE has no RAY_HEAD_PID" >&2; exit 1; }

# Worker nodes first (each `ray start --block` is its own process group), then the head.
for WPID in $WORKER_PIDS; do
  kill -TERM "$WPID" 2>/dev/null || true
done
for WPID in $WORKER_PIDS; do
  for _ in $(seq 1 60); do kill -0 "$WPID" 2>/dev/null || break; sleep 0.5; done
  kill -TERM -- "-$WPID" 2>/dev/null || true
  sleep 1
  kill -KILL -- "-$WPID" 2>/dev/null || true
done

group_alive() { pgrep -g "$PID" >/dev/null 2>&1; }

if group_alive; then
  # `ray start --block` stops its own processes on SIGTERM; the rest of the group after that.
  # It drains the node for up to 30 s first.
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 90); do kill -0 "$PID" 2>/dev/null || break; sleep 0.5; done
  kill -TERM -- "-$PID" 2>/dev/null || true
  for _ in $(seq 1 20); do group_alive || break; sleep 0.5; done
  if group_alive; then
    echo "local_stop: group $PID still alive after 55 s, sending SIGKILL" >&2
    kill -KILL -- "-$PID" 2>/dev/null || true
  fi
fi
rm -f "$STATE"
echo "local_stop: stopped Ray head pid $PID${WORKER_PIDS:+ and worker nodes $WORKER_PIDS} (logs kept in ${TEMP_DIR:-?}/session_latest/logs${WORKER_TEMP_DIRS:+ and $WORKER_TEMP_DIRS})"
