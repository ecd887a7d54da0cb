"""A failing stage, as a user sees it: the real `slim-ray` command ends with one line that names
the stage, the file and line, a hint, and the log file with the full trace; it exits 1."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

SLIM_RAY = os.path.join(os.path.dirname(sys.executable), "slim-ray")


def _clean_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SLIM_RAY_CACHE", "TMPDIR") if k in os.environ}
    return dict(env, HF_HUB_OFFLINE="1")


def test_malformed_reviews_line_gives_one_readable_error(tmp_path):
    reviews, meta = tmp_path / "reviews.json.gz", tmp_path / "meta.json.gz"
    with gzip.open(reviews, "wt") as f:
        for i in range(12):
            if i == 6:  # line 7 is cut short
                f.write('{"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 12\n')
            else:
                f.write(json.dumps({"reviewerID": f"U{i % 3}", "asin": f"A{i % 4}", "overall": 5.0,
                                    "unixReviewTime": 1000 + i}) + "\n")
    with gzip.open(meta, "wt") as f:
        for j in range(4):
            f.write(json.dumps({"asin": f"A{j}", "title": f"Game {j}", "category": ["Games"]}) + "\n")
    run = tmp_path / "run"
    out = subprocess.run(
        [SLIM_RAY, "prepare", "--set", f"run_dir={run}", "data.source=amazon", f"data.interactions={reviews}",
         f"data.items={meta}", "data.min_user_count=1", "data.min_item_count=1", "ray.num_cpus=1"],
        env=_clean_env(), capture_output=True, text=True, timeout=600)
    lines = (out.stdout + out.stderr).strip().splitlines()
    log = run / "logs" / "prepare.log"
    assert out.returncode == 1, lines[-20:]
    assert lines[-1] == (f"slim-ray: stage 'prepare' failed: {reviews}: line 7: malformed JSON: Expecting ',' "
                         f"delimiter at column 72 (set data.on_bad_lines=skip to drop such lines) "
                         f"(full trace in {log})"), lines[-1]
    assert "Traceback" not in out.stderr and len(lines) <= 8, "\n".join(lines)
    trace = log.read_text()
    assert "Traceback" in trace and "BadInputError" in trace
    assert not (run / "prepared" / "manifest.json").exists()


def test_a_local_run_starts_its_own_ray_whatever_else_runs_here(tmp_path):
    """ray.address unset means a new local Ray: not the cluster named by RAY_ADDRESS or recorded by
    someone's `ray start` (Ray 2.60 would join those for a bare ray.init()). RAY_ADDRESS points at
    a port nothing listens on: joining it would fail the stage."""
    run = tmp_path / "run"
    out = subprocess.run(
        [SLIM_RAY, "prepare", "--set", f"run_dir={run}", "data.max_users=30", "ray.num_cpus=1",
         "ray.include_dashboard=false"],
        env=dict(_clean_env(), RAY_ADDRESS="127.0.0.1:9"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    manifest = json.loads((run / "prepared" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["users"] > 0
