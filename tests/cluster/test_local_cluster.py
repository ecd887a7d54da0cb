"""cluster/local_start.sh -> `ray job submit ... jobs/run_pipeline.py` -> cluster/local_stop.sh, on
loopback, stopping only the cluster it started (by its recorded PID / process group)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _read_state(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        if "=" in line and not line.startswith(("#", "export")):
            k, v = line.strip().split("=", 1)
            out[k] = v
    return out


def _group_alive(pgid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_local_cluster_runs_a_submitted_job_and_stops_by_pid(tmp_path):
    state = tmp_path / "cluster.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(NUM_CPUS="1", RAY_BIN=RAY, START_TIMEOUT_S="300")
    start = None
    for attempt in range(2):  # retry once when a picked free port was taken before Ray bound it
        start = subprocess.run([os.path.join(ROOT, "cluster", "local_start.sh"), str(state)], env=env,
                               capture_output=True, text=True, timeout=420)
        if start.returncode == 0 or "exited early" not in start.stderr:
            break
    assert start.returncode == 0, start.stderr[-3000:]
    st = _read_state(str(state))
    pid = int(st["RAY_HEAD_PID"])
    assert st["RAY_TEMP_DIR"].startswith("/tmp/slimray.")
    try:
        assert st["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        assert st["RAY_GCS_ADDRESS"].startswith("127.0.0.1:")
        # The pipeline entrypoint as documented, on a slice of MovieLens-100K, up to `prepare`.
        run_dir = tmp_path / "run"
        job_env = dict(env, RAY_ADDRESS=st["RAY_ADDRESS"], RAY_AUTH_MODE=st["RAY_AUTH_MODE"])
        sub = subprocess.run(
            [RAY, "job", "submit", "--working-dir", ROOT, "--runtime-env", os.path.join(ROOT, "jobs", "runtime_env.yaml"),
             "--", "python", "jobs/run_pipeline.py", "--config", "configs/quick.yaml",
             "--set", f"run_dir={run_dir}", "data.max_users=30", "--until", "prepare"],
            cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=600)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-2000:]
        assert "joined Ray at auto" in sub.stdout and "'CPU': 1.0" in sub.stdout  # the cluster, not a new Ray
        assert "succeeded" in sub.stdout
        from slim_ray.data.io import read_sequences
        from slim_ray.lineage import read_manifest

        assert read_manifest(str(run_dir / "prepared"))["status"] == "complete"
        assert read_sequences(str(run_dir / "prepared" / "sequences")).num_rows == 30
    finally:
        stop = subprocess.run([os.path.join(ROOT, "cluster", "local_stop.sh"), str(state)],
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    deadline = time.time() + 10
    while _group_alive(pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _group_alive(pid) and not state.exists()
    shutil.rmtree(st["RAY_TEMP_DIR"], ignore_errors=True)  # the session logs of this test's cluster
    # Stopping again is refused clearly, not a broad stop.
    again = subprocess.run([os.path.join(ROOT, "cluster", "local_stop.sh"), str(state)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "nothing to stop" in again.stderr
