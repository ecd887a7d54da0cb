"""Kill the generation driver (SIGKILL) mid-run, rerun: one row per user, nothing generated twice.

The driver is a real ``slim-ray teach`` process with its own local Ray (which dies with it). Engine
calls are counted with ``teacher.call_log``: one line per row handed to the engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from gen_data import write_prepared
from slim_ray.data.io import read_rationales
from slim_ray.generate.store import part_files

N_USERS = 24


def _cmd(run: str, calls: str) -> list[str]:
    return [
        sys.executable, "-m", "slim_ray", "teach", "--set", f"run_dir={run}",
        "teacher.model=smollm2-135m-instruct", "teacher.num_users=null", "teacher.max_new_tokens=24",
        "teacher.min_new_tokens=24", "teacher.batch_size=2", "teacher.rows_per_file=2", f"teacher.call_log={calls}", "ray.num_cpus=2",
        "ray.include_dashboard=false",
    ]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def test_sigkill_then_resume(tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=N_USERS)
    calls = str(tmp_path / "calls.txt")
    out = os.path.join(run, "rationales", "teacher")
    log = open(tmp_path / "driver1.log", "w")
    p = subprocess.Popen(_cmd(run, calls), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and len(part_files(out)) < 2 and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, "driver finished before it could be killed: " + open(tmp_path / "driver1.log").read()[-3000:]
        assert len(part_files(out)) >= 2, "no parts written in time"
        os.kill(p.pid, signal.SIGKILL)  # the driver only
        p.wait(timeout=30)
        # its local Ray shares its fate; wait until every process it started is gone
        deadline = time.time() + 60
        while time.time() < deadline and not _group_gone(p.pid):
            time.sleep(0.5)
    finally:
        if not _group_gone(p.pid):
            os.killpg(p.pid, signal.SIGKILL)  # our own process group only
        log.close()
    before = {(r["user_id"], r["rationale_key"]) for f in part_files(out) for r in
              pq.read_table(f, columns=["user_id", "rationale_key"]).to_pylist()}
    assert 2 <= len(before) < N_USERS, f"{len(before)} rows before the kill"
    first_calls = [line.split() for line in open(calls).read().splitlines()]
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # the killed stage never looks complete

    res = subprocess.run(_cmd(run, calls), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    all_calls = [line.split() for line in open(calls).read().splitlines()]
    second = all_calls[len(first_calls):]
    assert len({c[0] for c in second}) == 1  # one run id: the resumed run
    second_pairs = {(int(u), k) for _, u, k in second}
    assert not (second_pairs & before), "rows written before the kill were generated again"
    assert len(second) == N_USERS - len(before)

    final = read_rationales(out)
    assert sorted(final["user_id"].to_pylist()) == list(range(1, N_USERS + 1))  # exactly one row per user
    assert final.filter(final["error"].is_valid()).num_rows == 0
    assert os.path.exists(os.path.join(out, "manifest.json"))
