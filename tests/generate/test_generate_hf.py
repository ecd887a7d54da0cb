"""The generation job with the hf engine (SmolLM2-135M, real generation on CPU, in the test Ray)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gen_data import sequences_table, write_prepared
from slim_ray.config import load_config
from slim_ray.data.io import read_rationales
from slim_ray.data.schemas import RATIONALES_SCHEMA, check_columns
from slim_ray.generate.engines import EngineError
from slim_ray.generate.models import GenerationError
from slim_ray.generate.stage import run_reason, run_teach, select_users
from slim_ray.generate.store import part_files
from slim_ray.prompts import cut_length

MODEL = "smollm2-135m-instruct"


def _calls(path) -> list[tuple[str, int, str]]:
    if not os.path.exists(path):
        return []
    return [tuple(line.split()) for line in open(path).read().splitlines()]


def test_teach_hf_contract_resume_and_retry(ray_session, tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=8, short_users=(3,))
    calls = str(tmp_path / "calls.txt")
    cfg = load_config(None, [
        f"run_dir={run}", f"teacher.model={MODEL}", "teacher.num_users=null", "teacher.max_new_tokens=12",
        "teacher.batch_size=3", f"teacher.call_log={calls}",
    ])
    s = run_teach(cfg)
    out = cfg.layout.rationales("teacher")
    t = read_rationales(out)
    check_columns(t, RATIONALES_SCHEMA, out)
    # user 3 has a 2-item sequence: empty training prefix -> skipped with a count
    assert s["skipped_short_prefix"] == 1 and s["users_selected"] == 8
    assert sorted(t["user_id"].to_pylist()) == [1, 2, 4, 5, 6, 7, 8]
    assert s["generated_rows"] == 7 and s["failed_rows_this_run"] == 0
    assert len(_calls(calls)) == 7
    seqs = {r["user_id"]: r["item_ids"] for r in sequences_table(8, (3,)).to_pylist()}
    for r in t.to_pylist():
        n_train = len(seqs[r["user_id"]]) - 2
        # the consistent cut (default): the first c items of the training prefix, c <= n_train
        assert r["prefix_len"] == cut_length(n_train, "consistent", 0.2, 3) <= n_train  # leakage guard
        assert r["role"] == "teacher" and r["prompt_version"] == "teacher-cot-v1"
        assert r["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert r["error"] is None and r["text"]
        assert 1 <= r["n_output_tokens"] <= 12 and r["n_prompt_tokens"] > 100
        assert r["prompt"].startswith("[system]\n") and "most recent first" in r["prompt"]
    assert len(set(t["rationale_key"].to_pylist())) == 7
    tokens_in, tokens_out = sum(t["n_prompt_tokens"].to_pylist()), sum(t["n_output_tokens"].to_pylist())
    assert s["prompt_tokens"] == tokens_in and s["output_tokens"] == tokens_out
    assert s["estimated_cost_usd"] == pytest.approx(tokens_in / 1000 * 0.0015 + tokens_out / 1000 * 0.002, abs=1e-6)
    assert (s["done_rows"], s["failed_rows"], s["missing_rows"]) == (7, 0, 0)
    assert (s["prompt_tokens_total"], s["output_tokens_total"]) == (tokens_in, tokens_out)
    assert len(part_files(out)) == 1  # parts are large: a 7-row run is one part
    assert len(s["node_ids"]) == 1 and len(s["node_ids"][0]) == 56  # the one local node
    # every row records the node that generated it; the summary's node_ids are those of the folder
    assert set(pq.read_table(part_files(out)[0], columns=["node_id"])["node_id"].to_pylist()) == set(s["node_ids"])
    assert s["output"]["rows"] == 7 and 0 <= s["output"]["share_all_three_steps"] <= 1

    # A row that failed (error set) is retried by the next run; the others are not generated again.
    victim = part_files(out)[0]
    pt = pq.read_table(victim)
    failed_uid = pt["user_id"][0].as_py()
    err = pc.if_else(pc.equal(pt["user_id"], failed_uid), "RuntimeError: simulated", pt["error"])
    pq.write_table(pt.set_column(pt.schema.get_field_index("error"), "error", err), victim)
    s2 = run_teach(cfg)
    assert s2["skipped_already_done"] == 6 and s2["generated_rows"] == 1
    second = [c for c in _calls(calls) if c[0] == s2["run_id"]]
    assert [int(c[1]) for c in second] == [failed_uid]
    t2 = read_rationales(out)
    assert sorted(t2["user_id"].to_pylist()) == [1, 2, 4, 5, 6, 7, 8]  # one row per user
    assert t2.filter(pc.is_valid(t2["error"])).num_rows == 0
    assert s2["compaction"]["dropped_superseded_error"] == 1
    # running totals: the retried row once, not once per attempt
    assert s2["done_rows"] == 7 and s2["failed_rows"] == 0
    assert s2["output_tokens_total"] == sum(t2["n_output_tokens"].to_pylist())


def test_seeded_sample_is_stable_and_nested(tmp_path):
    write_prepared(str(tmp_path), n_users=40)
    files = [str(tmp_path / "prepared" / "sequences" / "part-0.parquet")]
    a, n = select_users(files, 10, seed=0)
    b, _ = select_users(files, 10, seed=0)
    c, _ = select_users(files, 20, seed=0)
    d, _ = select_users(files, 10, seed=1)
    assert n == 10 and np.array_equal(a, b) and set(a) <= set(c) and not np.array_equal(a, d)
    assert select_users(files, None, 0) == (None, 40) and select_users(files, 100, 0) == (None, 40)


def test_bad_inputs_fail_before_any_work(tmp_path):
    run = str(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={run}", f"teacher.model={MODEL}"])
    with pytest.raises(GenerationError, match="sequences.*slim-ray prepare"):
        run_teach(cfg)
    write_prepared(run, n_users=4)
    with pytest.raises(EngineError, match="distill"):
        run_reason(cfg)  # the student defaults to model=distilled, not exported yet
    bad = load_config(None, [f"run_dir={run}", "teacher.model=no-such-model"])
    with pytest.raises(EngineError, match="no-such-model"):
        run_teach(bad)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(EngineError, match="config.json"):
        run_teach(load_config(None, [f"run_dir={run}", f"teacher.model={empty}"]))
    assert not os.path.exists(cfg.layout.rationales("teacher")) or not part_files(cfg.layout.rationales("teacher"))
