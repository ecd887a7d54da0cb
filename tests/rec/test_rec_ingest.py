"""rec.ingest=dataset: users reach the Ray Train workers through Ray Data (ray.train.get_dataset_shard)."""

import json
import os

import numpy as np
import pytest
import torch

from rec_testdata import cyclic_sequences, synthetic_run, tail_cuts, write_rationales, write_vectors
from slim_ray.config import load_config
from slim_ray.layout import RunLayout
from slim_ray.rec.data import MissingRationales, read_vectors
from slim_ray.rec.ingest import prepare_state, resolve_ingest
from slim_ray.rec.stage import run_evaluate, run_train
from slim_ray.rec.train import run_spec
from slim_ray.data.userstate import UserState

FAST = ["rec.hidden=32", "rec.max_len=16", "rec.batch_size=64", "rec.num_workers=2", "rec.ingest=dataset",
        "rec.backbone=sasrec", "rec.missing_rationale=learned", "evaluate.num_negatives=20"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ingest"))
    # 150 users walking 40 items in order; teacher rationales (and vectors) for the first 100 only
    synthetic_run(root, n_users=150, n_items=40, text_dim=16, rationale_users=100, roles=("teacher",))
    return root


def _meta(cfg, mode="slim", role="teacher"):
    with open(os.path.join(cfg.layout.rec_run("sasrec", mode, 0, role), "meta.json")) as f:
        return json.load(f)


def test_dataset_ingest_learns_and_publishes_a_self_contained_run(ray_session, root):
    cfg = load_config(None, [f"run_dir={root}", "rec.mode=[id,slim:teacher]", "rec.epochs=6", "rec.patience=6"] + FAST)
    summary = run_train(cfg)
    assert summary["ingest"] == "dataset" and summary["trained"] == 2
    meta = _meta(cfg)
    assert meta["ingest"] == "dataset" and meta["world_size"] == 2 and meta["n_users"] == 150
    assert meta["fallback_users"] == 50 and meta["fallback_user_ids"][:3] == [101, 102, 103]
    assert meta["rationale_protocol"] == "consistent" and len(meta["history"]) == 6
    # 75 users per worker, one window each (max_len 16 covers every history): 2 local batches of 32 a step
    assert all(h["steps"] == 2 and h["examples"] == 128 for h in meta["history"])
    assert meta["total_steps"] == 12
    # model.pt carries every user's rationale vector, written by rank 0 from the user state
    state = torch.load(os.path.join(cfg.layout.rec_run("sasrec", "slim", 0, "teacher"), "model.pt"), weights_only=True)
    ids, vecs = read_vectors(cfg.layout.user_embeddings("teacher"))
    assert state["user_text"].shape == (151, 16)
    np.testing.assert_array_equal(state["user_text"][ids].numpy(), vecs)
    assert state["user_has_text"][1:101].all() and not state["user_has_text"][101:].any()
    run_evaluate(cfg)
    with open(os.path.join(root, "eval", "metrics.json")) as f:
        m = json.load(f)
    for variant in ("id", "slim:teacher"):
        full = m["results"]["sasrec"][variant]["mean"]["full"]["ndcg@10"]
        # the next item is determined by the last one: far above the random ranker
        assert full > 2.5 * m["random"]["full"]["ndcg@10"], (variant, full)  # random: 0.16 here


def test_max_steps_and_the_checks_of_the_user_state(ray_session, root, tmp_path):
    cfg = load_config(None, [f"run_dir={root}", "rec.mode=slim:teacher", "rec.epochs=5", "rec.max_steps=3",
                             "rec.force=true"] + FAST)
    run_train(cfg)
    meta = _meta(cfg)
    assert meta["total_steps"] == 3 and meta["max_steps"] == 3
    assert [h["steps"] for h in meta["history"]] == [2, 1] and "valid_ndcg@10" in meta["history"][-1]
    # missing_rationale=error: the state task names the users, no user is read on the driver
    with pytest.raises(MissingRationales, match=r"50 of 150 users have no rationale vector, first user_ids \[101, 102"):
        run_train(load_config(None, [f"run_dir={root}", "rec.mode=slim:teacher", "rec.force=true"]
                              + FAST + ["rec.missing_rationale=error"]))
    # a rationale written past a user's training prefix would read the valid target
    bad = RunLayout(str(tmp_path / "bad"))
    synthetic_run(bad.root, n_users=20, n_items=10, text_dim=4, roles=("teacher",))
    write_rationales(bad.rationales("teacher"), np.arange(1, 21), [100] + [1] * 19, "teacher")
    with pytest.raises(ValueError, match=r"1 users have a rationale written past their training prefix .* \[1\]"):
        run_train(load_config(None, [f"run_dir={bad.root}", "rec.mode=slim:teacher"] + FAST))


def test_auto_picks_dataset_above_the_threshold(root):
    seqs = RunLayout(root).sequences
    assert resolve_ingest("auto", 149, seqs) == "dataset" and resolve_ingest("auto", 150, seqs) == "memory"
    assert resolve_ingest("auto", 10, seqs, max_users=50) == "memory"  # smoke runs read users in memory
    assert resolve_ingest("memory", 0, seqs) == "memory"
    with pytest.raises(ValueError, match="rec.max_users applies to rec.ingest=memory"):
        resolve_ingest("dataset", 0, seqs, max_users=5)


def test_an_ablation_role_takes_the_cut_of_its_base_role(tmp_path):
    """slim:teacher-step1 has vectors of its own and the rationales (hence the cuts) of teacher."""
    root = str(tmp_path / "run")
    synthetic_run(root, n_users=20, n_items=10, text_dim=4, rationale_users=15, roles=("teacher",))
    lay = RunLayout(root)
    write_vectors(lay.user_embeddings("teacher-step1"), np.arange(1, 18), np.ones((17, 4)), "user")
    cfg = load_config(None, [f"run_dir={root}", "rec.mode=slim:teacher-step1"] + FAST)
    spec = run_spec(cfg, "sasrec", "slim", "teacher-step1", 0, None, "dataset")
    info = prepare_state(root, spec, 10)
    st = UserState.open(info["state"])
    cuts = tail_cuts(cyclic_sequences(20, 10, 8, 16, 0))[:15] + [0] * 5  # users 16-20 have no rationale
    assert st.rationale_prefix_len.tolist() == cuts and st.vectors.shape == (20, 4)
    assert (info["users"], info["fallback"], info["fallback_ids"]) == (20, 3, [18, 19, 20])
    assert info["max_user_id"] == 20 and info["dim"] == 4 and info["n_items"] == 10
