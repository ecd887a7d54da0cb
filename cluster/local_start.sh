#!/usr/bin/env bash
# Start a Ray cluster on this machine only: a head (and WORKER_NODES worker nodes), every listener
# on 127.0.0.1, free ports, each node with its own temp dir, Ray's token auth on.
#
#   cluster/local_start.sh [STATE_FILE]        (default: runs/ray-local/cluster.env)
#   WORKER_NODES=1 cluster/local_start.sh ...  a head and one worker node: a two-node cluster
#   source runs/ray-local/cluster.env              # RAY_ADDRESS (for `ray job submit`), RAY_GCS_ADDRESS, ...
#   ray job submit --working-dir . -- python jobs/run_pipeline.py --config configs/demo.yaml
#   cluster/local_stop.sh [STATE_FILE]
#
# The head runs as `ray start --block` in a session of its own (setsid); its PID (= process group)
# is written to STATE_FILE so cluster/local_stop.sh stops exactly this cluster and nothing else.
# Each worker node is a `python -m slim_ray._ray_compat` process (a Ray node on 127.0.0.1 joined to
# the head) in a session of its own; their PIDs are recorded too (RAY_WORKER_PIDS) and stopped first.
# Env: NUM_CPUS (default: all; per node), RAY_BIN (default: .venv/bin/ray next to this repo, else `ray`),
#      START_TIMEOUT_S (default 180: how long to wait for the head to answer),
#      OBJECT_STORE_MB (per node; default Ray's), WORKER_NODES (default 0), HEAD_RESOURCES / WORKER_RESOURCES (JSON custom resources, default
#      {"node_head": 1} / {"node_worker_<i>": 1}),
#      RAY_AUTH_MODE (default: token -- clients need RAY_AUTH_MODE=token and the token in
#      ~/.ray/auth_token, created on first start; "disabled" turns auth off).
# Whatever else is in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for an s3:// run
# folder) is inherited by every node's workers and by submitted jobs.
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
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
DEFAULT_HEAD_RES='{"node_head": 1}'
HEAD_RES="${HEAD_RESOURCES:-$DEFAULT_HEAD_RES}"
ARGS=(start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT"
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true
      --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_HTTP_PORT"
      --dashboard-agent-grpc-port="$AGENT_GRPC_PORT" --runtime-env-agent-port="$RUNTIME_ENV_PORT"
      --metrics-export-port="$METRICS_PORT" --temp-dir="$TEMP_DIR" --disable-usage-stats
      --resources="$HEAD_RES")
[ -n "${NUM_CPUS:-}" ] && ARGS+=(--num-cpus="$NUM_CPUS")
[ -n "${OBJECT_STORE_MB:-}" ] && ARGS+=(--object-store-memory="$((OBJECT_STORE_MB * 1024 * 1024))")

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
RAY_WORKER_PIDS=
RAY_WORKER_TEMP_DIRS=
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_ADDRESS RAY_AUTH_MODE RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
STATE_EOF

# Worker nodes join the head's GCS; each gets its own free ports and temp dir.
start_workers() {
  local n="${WORKER_NODES:-0}" i wpids="" wdirs=""
  for i in $(seq 1 "$n"); do
    local WTEMP; WTEMP="$(mktemp -d /tmp/slimray.XXXXXX)"
    # A node that joins a loopback head: `ray start --address` cannot (see slim_ray/_ray_compat.py).
    local WARGS=(-m slim_ray._ray_compat --gcs "127.0.0.1:$GCS_PORT" --temp-dir "$WTEMP"
                 --resources "${WORKER_RESOURCES:-"{\"node_worker_$i\": 1}"}")
    [ -n "${NUM_CPUS:-}" ] && WARGS+=(--num-cpus "$NUM_CPUS")
    [ -n "${OBJECT_STORE_MB:-}" ] && WARGS+=(--object-store-mb "$OBJECT_STORE_MB")
    setsid "$PY" "${WARGS[@]}" >"$WTEMP/ray_start.log" 2>&1 < /dev/null &
    wpids="$wpids $!"; wdirs="$wdirs $WTEMP"
  done
  [ "$n" -gt 0 ] || return 0
  sed -i "s|^RAY_WORKER_PIDS=.*|RAY_WORKER_PIDS=\"${wpids# }\"|; s|^RAY_WORKER_TEMP_DIRS=.*|RAY_WORKER_TEMP_DIRS=\"${wdirs# }\"|" "$STATE"
  # Ready when every worker node says it joined (printed once its raylet is registered).
  local w joined
  while [ "$(date +%s)" -lt "$DEADLINE" ]; do
    joined=0
    for w in $wdirs; do grep -q "joined" "$w/ray_start.log" 2>/dev/null && joined=$((joined + 1)); done
    if [ "$joined" -eq "$n" ]; then
      echo "local_start: $n worker node(s) joined (pids${wpids})"
      return 0
    fi
    for w in $wpids; do
      kill -0 "$w" 2>/dev/null || { echo "local_start: worker node $w exited; log:" >&2; tail -n 20 $wdirs >&2 2>/dev/null
                                     "$HERE/local_stop.sh" "$STATE" >&2 || true; exit 1; }
    done
    sleep 1
  done
  echo "local_start: worker nodes did not join in time; see ${wdirs# }/ray_start.log" >&2
  "$HERE/local_stop.sh" "$STATE" >&2 || true   # what did start (the head, the other nodes)
  exit 1
}

# Ready when the dashboard and the node's job agent answer (START_TIMEOUT_S, default 180 s).
DEADLINE=$(( $(date +%s) + ${START_TIMEOUT_S:-180} ))
while [ "$(date +%s)" -lt "$DEADLINE" ]; do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "local_start: ray start exited early; log:" >&2; tail -n 30 "$TEMP_DIR/ray_start.log" >&2
    rm -f "$STATE"; rm -rf "$TEMP_DIR"; exit 1
  fi
  if "$PY" - "$DASH_PORT" "$AGENT_HTTP_PORT" <<'PY_EOF' 2>/dev/null
import os, sys, urllib.request
headers = {}
if os.environ.get("RAY_AUTH_MODE") == "token":  # the token `ray start` created or was given
    token = os.environ.get("RAY_AUTH_TOKEN") or open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    headers["Authorization"] = f"Bearer {token}"
for url in (f"http://127.0.0.1:{sys.argv[1]}/api/version", f"http://127.0.0.1:{sys.argv[2]}/api/healthz"):
    urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).read()  # dashboard, job agent
PY_EOF
  then
    echo "local_start: Ray head pid $PID ready; dashboard/jobs http://127.0.0.1:$DASH_PORT, GCS 127.0.0.1:$GCS_PORT; state in $STATE"
    start_workers
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
