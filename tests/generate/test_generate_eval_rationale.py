"""``eval_rationale: full_prefix``: the generation stage writes the cut rationales and a second set
from the whole training prefix into ``rationales/<role>-full/``, each resumable on its own. Against
the scale stand-in (an OpenAI-compatible server of ours on loopback, deterministic answers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from gen_data import write_prepared
from slim_ray.config import load_config
from slim_ray.data.io import read_rationales
from slim_ray.generate.stage import run_teach
from slim_ray.prompts.builder import cut_length

N_USERS = 9


def _start_standin(tmp_path) -> tuple[subprocess.Popen, str]:
    ready = str(tmp_path / "standin.json")
    proc = subprocess.Popen([sys.executable, "-m", "slim_ray.scale.standin", "--port", "0", "--words", "12",
                             "--ready-file", ready], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the stand-in did not start within 60 s"
        time.sleep(0.1)
    with open(ready) as f:
        return proc, json.load(f)["url"]


def test_second_set_from_the_full_training_prefix(ray_session, tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=N_USERS)  # user u: 4 + u % 5 items, a training prefix of 2 + u % 5
    proc, url = _start_standin(tmp_path)
    try:
        cfg = load_config(None, [
            f"run_dir={run}", "teacher.engine=openai", "teacher.model=stand-in", f"teacher.base_url={url}",
            "teacher.num_users=null", "teacher.batch_size=4", "teacher.eval_rationale=full_prefix",
        ])
        s = run_teach(cfg)
        cut = read_rationales(cfg.layout.rationales("teacher")).sort_by("user_id")
        full = read_rationales(cfg.layout.rationales("teacher-full")).sort_by("user_id")
        users = list(range(1, N_USERS + 1))
        assert cut["user_id"].to_pylist() == full["user_id"].to_pylist() == users
        train_len = {u: 2 + u % 5 for u in users}
        assert cut["prefix_len"].to_pylist() == [cut_length(train_len[u], "consistent") for u in users]
        assert full["prefix_len"].to_pylist() == [train_len[u] for u in users]
        assert any(c < f for c, f in zip(cut["prefix_len"].to_pylist(), full["prefix_len"].to_pylist()))
        # other prompts, so other keys; both sets are complete rows of the teacher
        assert not set(cut["rationale_key"].to_pylist()) & set(full["rationale_key"].to_pylist())
        assert set(full["role"].to_pylist()) == {"teacher"} and full.filter(full["error"].is_valid()).num_rows == 0
        assert s["done_rows"] == N_USERS and s["rationale_cut"] == "consistent"
        assert s["full_prefix"]["done_rows"] == N_USERS and s["full_prefix"]["rationale_cut"] == "full_prefix"
        assert s["full_prefix"]["out"].endswith("rationales/teacher-full") and s["failed_rows"] == 0

        # a rerun resumes both sets: nothing left to generate
        s2 = run_teach(cfg)
        assert s2["generated_rows"] == 0 and s2["full_prefix"]["generated_rows"] == 0
        assert s2["full_prefix"]["skipped_already_done"] == N_USERS
    finally:
        proc.terminate()
        proc.wait(timeout=30)
