#!/usr/bin/env bash
# Submit the SLIM pipeline to a running Ray cluster as a Ray job, and wait for it.
#
#   jobs/submit.sh --config configs/quick.yaml --set run_dir=s3://bucket/quick [--until STAGE] [...]
#
# Everything after the script name goes to jobs/run_pipeline.py. The cluster is RAY_ADDRESS (its
# dashboard/jobs URL, e.g. http://127.0.0.1:8265, written by cluster/local_start.sh into its state
# file); with token auth on (the default), RAY_AUTH_MODE=token and the cluster's token
# (~/.ray/auth_token or RAY_AUTH_TOKEN) are needed. The repository is uploaded as the working
# dir with jobs/runtime_env.yaml. Storage credentials are not passed here: the nodes have them in
# their environment (instance role, pod env, or the environment `ray start` ran in).
# SUBMISSION_ID names the job (default: Ray picks one). Exit status: the job's (0 = SUCCEEDED).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY_BIN="${RAY_BIN:-$HERE/.venv/bin/ray}"
[ -x "$RAY_BIN" ] || RAY_BIN="$(command -v ray)"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the jobs URL of the cluster, e.g. http://host:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ID_ARGS=()
[ -n "${SUBMISSION_ID:-}" ] && ID_ARGS=(--submission-id "$SUBMISSION_ID")
cd "$HERE"
exec "$RAY_BIN" job submit --working-dir . --runtime-env jobs/runtime_env.yaml "${ID_ARGS[@]}" \
  -- python jobs/run_pipeline.py "$@"
