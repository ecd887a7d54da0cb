"""End to end: `slim-ray run --config configs/quick.yaml` on a MovieLens-100K slice.

Asserts that every stage produced its contract, that the leakage guard holds (rationales see only
the training prefix), that every recommender variant beats the random ranker, and that an
immediate rerun skips every stage.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.compute as pc
import pytest

from slim_ray.config import load_config
from slim_ray.data import io
from slim_ray.data.schemas import embeddings_schema, check_columns
from slim_ray.stages import PIPELINE_ORDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(ray_session, tmp_path_factory):
    from slim_ray.pipeline import run_pipeline

    run_dir = str(tmp_path_factory.mktemp("quick") / "run")
    cfg = load_config(os.path.join(ROOT, "configs", "quick.yaml"), [f"run_dir={run_dir}"])
    t0 = time.time()
    first = run_pipeline(cfg)
    first_s = time.time() - t0
    t0 = time.time()
    second = run_pipeline(cfg)
    second_s = time.time() - t0
    return cfg, first, first_s, second, second_s


def test_every_stage_ran_then_rerun_skips_all(quick_run):
    cfg, first, first_s, second, second_s = quick_run
    assert [r["stage"] for r in first] == PIPELINE_ORDER
    assert not any(r["skipped"] for r in first)
    assert all(r["skipped"] for r in second), [r["stage"] for r in second if not r["skipped"]]
    assert second_s < first_s / 5
    for st in PIPELINE_ORDER:
        from slim_ray.stages import STAGES

        m = json.load(open(os.path.join(STAGES[st].output(cfg), "manifest.json")))
        assert m["status"] == "complete" and m["stage"] == st


def test_contracts_and_leakage_guard(quick_run):
    cfg = quick_run[0]
    lay = cfg.layout
    items = io.read_items(lay.items)
    seqs = io.read_sequences(lay.sequences)
    assert seqs.num_rows == 200  # data.max_users
    n_items = items.num_rows
    assert sorted(items["item_id"].to_pylist()) == list(range(1, n_items + 1))
    lengths = {u: len(s) for u, s in zip(seqs["user_id"].to_pylist(), seqs["item_ids"].to_pylist())}
    seq_by_user = dict(zip(seqs["user_id"].to_pylist(), seqs["item_ids"].to_pylist()))
    title = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))

    teacher = io.read_rationales(lay.rationales("teacher"))
    student = io.read_rationales(lay.rationales("student"))
    assert teacher.num_rows == 16 and set(teacher["role"].to_pylist()) == {"teacher"}
    assert student.num_rows == len(lengths) and set(student["role"].to_pylist()) == {"student"}
    assert len(pc.unique(student["user_id"])) == student.num_rows
    for tbl in (teacher, student):
        assert pc.sum(pc.is_null(tbl["error"])).as_py() == tbl.num_rows
        for uid, plen, prompt in zip(tbl["user_id"].to_pylist(), tbl["prefix_len"].to_pylist(),
                                     tbl["prompt"].to_pylist()):
            assert 1 <= plen <= lengths[uid] - 2  # leakage guard
            seq = seq_by_user[uid]
            prefix_titles = {title[i] for i in seq[:plen]}
            for held_out in seq[-2:]:  # validation and test items never reach the prompt
                if title[held_out] not in prefix_titles and len(title[held_out]) > 6:
                    assert title[held_out] not in prompt, (uid, title[held_out])

    item_emb = io.read_table(lay.item_embeddings)
    check_columns(item_emb, embeddings_schema(384), lay.item_embeddings)
    assert item_emb.num_rows == n_items
    for role, n in (("teacher", 16), ("student", len(lengths))):
        emb = io.read_table(lay.user_embeddings(role))
        assert emb.num_rows == n and set(emb["kind"].to_pylist()) == {"user"}
        v = np.stack(emb["vector"].to_numpy(zero_copy_only=False))
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)


def test_every_variant_beats_random_and_report_written(quick_run):
    cfg = quick_run[0]
    metrics = json.load(open(os.path.join(cfg.layout.eval, "metrics.json")))
    rnd = metrics["random"]["sampled"]["ndcg@10"]
    variants = {(bb, v) for bb, vs in metrics["results"].items() for v in vs}
    assert variants == {(bb, v) for bb in ("sasrec", "gru4rec")
                        for v in ("id", "id_text", "slim:teacher", "slim:student", "text:student")}
    for bb, vs in metrics["results"].items():
        for v, e in vs.items():
            ndcg = e["mean"]["sampled"]["ndcg@10"]
            assert ndcg > 1.5 * rnd, (bb, v, ndcg, rnd)
    report = open(os.path.join(cfg.layout.report, "report.md")).read()
    assert "Sampled-100" in report and "Full ranking" in report and "SLIM (student rationales)" in report
    # the cost table names the distilled student by its folder's last parts, not the run's absolute path
    student_row = next(line for line in report.splitlines() if line.startswith("| student | "))
    assert student_row.startswith("| student | merged:…/distill/merged#"), student_row
    assert os.path.abspath(cfg.run_dir) not in student_row, student_row
    for png in ("metrics_sampled.png", "metrics_full.png", "throughput.png"):
        assert os.path.getsize(os.path.join(cfg.layout.report, png)) > 5000
