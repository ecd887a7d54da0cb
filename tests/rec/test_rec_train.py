"""Ray Train end to end on tiny synthetic data: learning, DDP equivalence, sweep + metrics.json, CLI."""

import json
import os

import pytest

from rec_testdata import synthetic_run
from slim_ray.config import load_config
from slim_ray.rec.stage import run_evaluate, run_train

FAST = ["rec.hidden=32", "rec.max_len=16", "rec.batch_size=64", "ray.num_cpus=4"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recsynth"))
    # 150 users walking 40 items in order; teacher rationales for 100 users only (like the pipeline).
    synthetic_run(root, n_users=150, n_items=40, text_dim=16, rationale_users=100, roles=("teacher",))
    return root


def test_sweep_learns_the_pattern_and_writes_metrics(ray_session, synth_root):
    cfg = load_config(None, [f"run_dir={synth_root}", "rec.backbone=sasrec", "rec.mode=[id,slim:teacher]",
                             "rec.seeds=[0,1]", "rec.epochs=6", "rec.patience=3",
                             "rec.missing_rationale=learned", "evaluate.num_negatives=20"] + FAST)
    summary = run_train(cfg)
    assert summary["trained"] == 4 and set(summary["runs"]) == {
        "sasrec-id-s0", "sasrec-id-s1", "sasrec-slim-teacher-s0", "sasrec-slim-teacher-s1"}
    assert summary["runs"]["sasrec-slim-teacher-s0"]["fallback_users"] == 50
    # A second call finds every run done.
    assert run_train(cfg)["skipped"] == 4
    run_evaluate(cfg)
    with open(os.path.join(synth_root, "eval", "metrics.json")) as f:
        m = json.load(f)
    assert os.path.exists(os.path.join(synth_root, "eval", "candidates", "key.json"))
    rid = m["results"]["sasrec"]["id"]
    assert rid["seeds"] == [0, 1] and set(rid["per_seed"]) == {"0", "1"}
    for prot in ("sampled", "full"):
        # The next item is determined by the last one: far above the random ranker.
        assert rid["mean"][prot]["ndcg@10"] > 4 * m["random"][prot]["ndcg@10"], (prot, rid["mean"][prot])
        assert rid["std"][prot]["ndcg@10"] >= 0
    assert m["random"]["sampled"]["hr@10"] == pytest.approx(10 / 21)
    assert m["results"]["sasrec"]["slim:teacher"]["fallback_users"] == [50, 50]
    sig = m["significance"]["sasrec"]["slim:teacher"]["full"]
    assert sig["baseline"] == "id" and sig["n_users"] == 150 and 0 <= sig["p_ttest"] <= 1


def test_ddp_two_workers_match_one_worker(ray_session, synth_root):
    """Also with the weight average and window jitter on: both are drawn and updated alike on every worker."""
    common = [f"run_dir={synth_root}", "rec.backbone=gru4rec", "rec.mode=id", "rec.epochs=3", "rec.patience=3",
              "rec.params={dropout: 0.0, ema_decay: 0.9, window_stride: 3, window_jitter: true}"] + FAST + [
              "rec.max_len=6"]  # several windows per user, so the jitter moves them
    res = {}
    for w in (1, 2):
        cfg = load_config(None, common + [f"rec.num_workers={w}", f"run_dir={synth_root}/w{w}"])
        os.makedirs(cfg.run_dir, exist_ok=True)
        for sub in ("prepared", "embeddings"):
            if not os.path.exists(os.path.join(cfg.run_dir, sub)):
                os.symlink(os.path.join(synth_root, sub), os.path.join(cfg.run_dir, sub))
        run_train(cfg)
        with open(os.path.join(cfg.layout.rec_run("gru4rec", "id", 0), "meta.json")) as f:
            res[w] = json.load(f)
    assert res[2]["world_size"] == 2 and res[2]["hp"]["ema_decay"] == 0.9
    assert len({h["examples"] for h in res[1]["history"]}) > 1  # jitter: other windows every epoch
    for h1, h2 in zip(res[1]["history"], res[2]["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-3)
        assert h2["valid_ndcg@10"] == pytest.approx(h1["valid_ndcg@10"], abs=1e-3)


def test_cli_single_run_and_missing_rationales(ray_session, synth_root, capsys):
    from slim_ray.cli import main

    with pytest.raises(Exception, match=r"50 of 150 users have no rationale vector, first user_ids \[101, 102"):
        run_train(load_config(None, [f"run_dir={synth_root}", "rec.mode=slim:teacher"]))
    assert main(["train", "--set", f"run_dir={synth_root}", "rec.backbone=srgnn", "rec.mode=id_text",
                 "rec.epochs=1", *FAST]) == 0
    with open(os.path.join(synth_root, "rec", "srgnn-id_text-s0", "meta.json")) as f:
        meta = json.load(f)
    assert meta["backbone"] == "srgnn" and meta["variant"] == "id_text" and len(meta["history"]) == 1
    assert os.path.exists(os.path.join(synth_root, "rec", "manifest.json"))
