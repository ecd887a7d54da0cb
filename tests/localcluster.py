"""cluster/local_start.sh and local_stop.sh as tests use them: start with retries, read the state
file, stop by the recorded PIDs (never `ray stop`)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = os.path.join(ROOT, "cluster", "local_start.sh")
STOP = os.path.join(ROOT, "cluster", "local_stop.sh")


def read_state(path) -> dict[str, str]:
    """The KEY=VALUE lines of a state file written by cluster/local_start.sh."""
    out = {}
    for line in open(path):
        if "=" in line and not line.startswith(("#", "export")):
            k, v = line.strip().split("=", 1)
            out[k] = v.strip('"')
    return out


def start(state, env: dict, attempts: int = 3) -> subprocess.CompletedProcess:
    """local_start.sh, again when a node missed Ray's hard-coded 30 s start window (a loaded 2-core
    machine can); what did start of a failed attempt is stopped first. Returns the last attempt."""
    for _ in range(attempts):
        result = subprocess.run([START, str(state)], env=env, capture_output=True, text=True, timeout=420)
        if result.returncode == 0:
            break
        if os.path.exists(state):  # the head started but a worker node did not: stop what did start
            stop(state)
        if not any(w in result.stderr for w in ("timed out during startup", "exited early", "exited; log")):
            break
    return result


def stop(state) -> subprocess.CompletedProcess:
    return subprocess.run([STOP, str(state)], capture_output=True, text=True, timeout=180)
