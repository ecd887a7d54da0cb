"""cluster/local_start.sh -> `ray job submit` -> cluster/local_stop.sh, on loopback, stopping only
the cluster it started (by its recorded PID / process group)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

JOB = """
import ray
ray.init(address="auto")
print("CPUS", ray.cluster_resources().get("CPU"))
print("ANSWER", ray.get(ray.remote(lambda x: 2 * x).remote(21)))
"""


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
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "job.py").write_text(JOB)
        job_env = dict(env, RAY_ADDRESS=st["RAY_ADDRESS"], RAY_AUTH_MODE=st["RAY_AUTH_MODE"])
        sub = subprocess.run([RAY, "job", "submit", "--working-dir", str(job_dir), "--", "python", "job.py"],
                             env=job_env, capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]
        assert "ANSWER 42" in sub.stdout and "CPUS 1.0" in sub.stdout
        assert "succeeded" in sub.stdout
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
