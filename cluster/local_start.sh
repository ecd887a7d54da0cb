#!/usr/bin/env bash
# Start a Ray head for this machine only: every listener on 127.0.0.1, free ports, its own temp dir.
#
#   cluster/local_start.sh [STATE_FILE]        (default: runs/ray-local/cluster.env)
#   source runs/ray-local/cluster.env              # RAY_ADDRESS (for `ray job submit`), RAY_GCS_ADDRESS, ...
#   ray job submit --working-dir . -- python jobs/run_pipeline.py --config configs/demo.yaml
#   cluster/local_stop.sh [STATE_FILE]
#
# The head runs as `ray start --block` in a session of its own (setsid); its PID (= process group)
# is written to STATE_FILE so cluster/local_stop.sh stops exactly this cluster and nothing else.
# Env: NUM_CPUS (default: all), RAY_BIN (default: .venv/bin/ray next to this repo, else `ray`),
#      START_TIMEOUT_S (default 180: how long to wait for the head to answer),
#      RAY_AUTH_MODE (default: disabled -- loopback only; set "token" to require Ray's token auth).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${1:-${SLIM_RAY_CLUSTER_STATE:-runs/ray-local/cluster.env}}"
RAY_BIN="${RAY_BIN:-$HERE/../.venv/bin/ray}"
[ -x "$RAY_BIN" ] || RAY_BIN="$(command -v ray || true)"
[ -n "$RAY_BIN" ] || { echo "local_start: no 'ray' executable (set RAY_BIN)" >&2; exit 2; }
PY="$(dirname "$RAY_BIN")/python"; [ -x "$PY" ] || PY=python3

if [ -f "$STATE" ]; then
  # shellcheck disable=SC1090
  OLD_PID="$(. "$STATE"; echo "${RAY_HEAD_PID:-}")"
  if [ -n "$OLD_PID" ] && kill -0 "$OLD_PID" 2>/dev/null; then
    echo "local_start: a cluster from $STATE is already running (pid $OLD_PID); stop it first" >&2
    exit 1
  fi
fi

# Every port picked free (and distinct: all sockets are held open together while picking):
# fixed defaults (6379, 8265, 52365, ...) clash with any other Ray on the machine.
read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_HTTP_PORT AGENT_GRPC_PORT RUNTIME_ENV_PORT METRICS_PORT < <(
  "$PY" -c 'import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
TEMP_DIR="$(mktemp -d /tmp/slimray.XXXXXX)"   # short: Ray's unix socket paths must stay < 108 chars
mkdir -p "$(dirname "$STATE")"

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0     # keep GCS/raylet/workers on 127.0.0.1
export PATH="$(dirname "$RAY_BIN"):$PATH"      # `python` in a job's entrypoint = the env that has Ray
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
ARGS=(start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT"
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true
      --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_HTTP_PORT"
      --dashboard-agent-grpc-port="$AGENT_GRPC_PORT" --runtime-env-agent-port="$RUNTIME_ENV_PORT"
      --metrics-export-port="$METRICS_PORT" --temp-dir="$TEMP_DIR" --disable-usage-stats)
[ -n "${NUM_CPUS:-}" ] && ARGS+=(--num-cpus="$NUM_CPUS")

setsid "$RAY_BIN" "${ARGS[@]}" >"$TEMP_DIR/ray_start.log" 2>&1 < /dev/null &
PID=$!

cat >"$STATE" <<STATE_EOF
# written by cluster/local_start.sh; read by cluster/local_stop.sh
RAY_HEAD_PID=$PID
RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT
RAY_CLIENT_ADDRESS=ray://127.0.0.1:$CLIENT_PORT
RAY_TEMP_DIR=$TEMP_DIR
RAY_AUTH_MODE=$RAY_AUTH_MODE
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_ADDRESS RAY_AUTH_MODE RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
STATE_EOF

# Ready when the dashboard and the node's job agent answer (START_TIMEOUT_S, default 180 s).
DEADLINE=$(( $(date +%s) + ${START_TIMEOUT_S:-180} ))
while [ "$(date +%s)" -lt "$DEADLINE" ]; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "local_start: ray start exited early; log:" >&2; tail -n 30 "$TEMP_DIR/ray_start.log" >&2
    rm -f "$STATE"; rm -rf "$TEMP_DIR"; exit 1
  fi
  if "$PY" - "$DASH_PORT" "$AGENT_HTTP_PORT" <<'PY_EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=10).read()
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/api/healthz", timeout=10).read()  # job agent
PY_EOF
  then
    echo "local_start: Ray head pid $PID ready; dashboard/jobs http://127.0.0.1:$DASH_PORT, GCS 127.0.0.1:$GCS_PORT; state in $STATE"
    exit 0
  fi
  sleep 0.5
done
echo "local_start: timed out waiting for http://127.0.0.1:$DASH_PORT; stopping pid $PID (log: $TEMP_DIR/ray_start.log)" >&2
kill -TERM -- "-$PID" 2>/dev/null || true
for _ in $(seq 1 90); do pgrep -g "$PID" >/dev/null 2>&1 || break; sleep 0.5; done   # Ray drains for up to 30 s
kill -KILL -- "-$PID" 2>/dev/null || true
rm -f "$STATE"
exit 1
