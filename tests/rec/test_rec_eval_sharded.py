"""Sharded evaluation on real Parquet sequences (several parts, small row groups), real finished run
folders and real Ray tasks: the same numbers as one process, candidates independent of the shards,
per-user rows, the paired t-test from sums."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy import stats

from rec_testdata import cyclic_sequences, publish_untrained_run, synthetic_run
from slim_ray import storage
from slim_ray.config import load_config
from slim_ray.data.schemas import SEQUENCES_SCHEMA
from slim_ray.rec import data as rd
from slim_ray.rec.evaluate import (
    draw_user_negatives, evaluate_all, evaluate_run, plan_shards, read_candidates,
)
from slim_ray.rec.metrics import (
    add_paired_sums, metric_names, paired_sums, paired_t_from_sums, paired_test, paired_test_from_sums,
    random_reference,
)

U, N_ITEMS, NEG, KS = 90, 40, 20, [5, 10]
# (backbone, mode, role, seed, max_users): two id seeds, a SLIM variant, and a max_users run
RUNS = [("sasrec", "id", None, 0, None), ("sasrec", "id", None, 1, None),
        ("sasrec", "slim", "teacher", 0, None), ("gru4rec", "id", None, 0, 25)]


def _write_parts(root: str) -> None:
    """The sequences as 3 parts with users shuffled across them, row groups of 10 rows, one user
    too short to evaluate (2 items), and a 4th part of short users only."""
    seqs = cyclic_sequences(U, N_ITEMS, 8, 16, seed=0)
    seqs[40] = seqs[40][:2]
    storage.delete_dir(storage.join(root, "prepared", "sequences"))
    order = np.random.default_rng(3).permutation(U) + 1
    for i, users in enumerate(np.array_split(order, 3)):
        t = pa.table({"user_id": pa.array(users, pa.int64()), "user_key": [f"u{u}" for u in users],
                      "item_ids": pa.array([seqs[u - 1] for u in users], pa.list_(pa.int64())),
                      "timestamps": pa.array([list(range(len(seqs[u - 1]))) for u in users], pa.list_(pa.int64()))},
                     schema=SEQUENCES_SCHEMA)
        storage.write_table(t, storage.join(root, "prepared", "sequences", f"part-{i}.parquet"), row_group_size=10)
    # a part whose users are all too short: a shard with no user to evaluate
    storage.write_table(pa.table({"user_id": pa.array([U + 1, U + 2], pa.int64()), "user_key": ["x", "y"],
                                  "item_ids": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
                                  "timestamps": pa.array([[0, 1], [0]], pa.list_(pa.int64()))}, schema=SEQUENCES_SCHEMA),
                        storage.join(root, "prepared", "sequences", "part-3.parquet"))


def _finished_runs(root: str) -> None:
    """Untrained (seeded) models published as finished run folders: what evaluation reads."""
    for bb, mode, role, seed, mu in RUNS:
        publish_untrained_run(root, bb, mode, role, seed,
                              ["rec.hidden=16", "rec.max_len=8", "rec.missing_rationale=learned",
                               "rec.rationale_protocol=leaky"] + ([f"rec.max_users={mu}"] if mu else []),
                              torch_seed=seed + 10 * len(mode), n_items=N_ITEMS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evalshard"))
    synthetic_run(root, n_users=U, n_items=N_ITEMS, text_dim=8, roles=("teacher",))
    _write_parts(root)
    _finished_runs(root)
    return root


def _cfg(root):
    return load_config(None, [f"run_dir={root}", f"evaluate.num_negatives={NEG}", "evaluate.ks=[5,10]",
                              "evaluate.batch_users=7"])


def _candidates(root) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_candidates(f) for f in storage.parquet_files(storage.join(root, "eval", "candidates"))]
    users = np.concatenate([u for u, _ in parts])
    cand = np.concatenate([c for _, c in parts])
    order = np.argsort(users)
    assert len(np.unique(users)) == len(users)
    return users[order], cand[order]


def _per_user(root) -> pa.Table:
    t = storage.read_table(storage.join(root, "eval", "per_user"))
    return t.sort_by([("run", "ascending"), ("protocol", "ascending"), ("user_id", "ascending")])


def test_sharded_metrics_equal_one_process_and_shards_do_not_change_candidates(ray_session, root):
    import ray

    cfg = _cfg(root)
    assert len(plan_shards(cfg.layout.sequences, 10)) == 10 and len(plan_shards(cfg.layout.sequences)) == 4
    m, info = evaluate_all(cfg, shard_users=10)
    assert info["shards"] == 10 and m["shards"] == 10 and not m["sampled"]["reused"]
    assert info["node_ids"] == [ray.get_runtime_context().get_node_id()]
    data = rd.load_sequences(cfg.layout.sequences, None, N_ITEMS)
    assert m["num_users"] == len(data) == U - 1

    # (b) candidates: the target, then NEG distinct items outside the user's sequence, from the
    # user's own generator
    users, cand = _candidates(root)
    assert (users == data.user_ids).all() and cand.shape == (U - 1, 1 + NEG)
    for u, s, c in zip(data.user_ids, data.seqs, cand):
        assert c[0] == s[-1] and len(set(c[1:])) == NEG and not set(c[1:]) & set(s.tolist())
        assert c[1:].min() >= 1 and c[1:].max() <= N_ITEMS
    assert (cand[5, 1:] == draw_user_negatives(data.seqs[5], N_ITEMS, NEG, cfg.evaluate.candidates_seed,
                                               data.user_ids[5])).all()

    # (a) the same numbers as one process over every user with the same candidates
    per_user = {}
    for bb, mode, role, seed, mu in RUNS:
        run_dir = cfg.layout.rec_run(bb, mode, seed, role)
        sub = rd.load_sequences(cfg.layout.sequences, mu, N_ITEMS)
        pu, meta = evaluate_run(run_dir, sub, cand[:len(sub)], KS, 64)
        per_user[storage.basename(run_dir)] = pu
        got = m["results"][bb][meta["variant"]]
        assert got["n_users"] == len(sub)
        for p in ("sampled", "full"):
            for name in metric_names(KS):
                assert got["per_seed"][str(seed)][p][name] == pytest.approx(float(np.mean(pu[p][name])), abs=1e-9)
    ids = m["results"]["sasrec"]["id"]
    assert ids["mean"]["full"]["ndcg@10"] == pytest.approx(
        np.mean([ids["per_seed"][s]["full"]["ndcg@10"] for s in ("0", "1")]), abs=1e-12)
    assert m["results"]["gru4rec"]["id"]["n_users"] == 25
    assert m["random"]["sampled"]["hr@10"] == pytest.approx(10 / (1 + NEG), abs=1e-12)
    ref_full = random_reference(rd.eval_split(data, "test", 1).n_candidates, KS)
    assert m["random"]["full"] == pytest.approx(ref_full, abs=1e-12)
    for p in ("sampled", "full"):
        sig = m["significance"]["sasrec"]["slim:teacher@leaky"][p]
        assert sig["baseline"] == "id"  # the only baseline of this sweep
        a = per_user["sasrec-slim-teacher-s0"][p]["ndcg@10"]
        b = np.mean([per_user[f"sasrec-id-s{s}"][p]["ndcg@10"] for s in (0, 1)], axis=0)
        ref = paired_test(a, b)
        assert sig["n_users"] == U - 1
        for k in ("mean_a", "mean_b", "mean_diff", "t_stat"):
            assert sig[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
        assert sig["p_ttest"] == pytest.approx(ref["p_ttest"], rel=1e-9)
        assert sig["p_wilcoxon"] == pytest.approx(ref["p_wilcoxon"], rel=1e-12)
    assert "gru4rec" not in m["significance"]  # no baseline pair scored the same users

    # (c) one row per user, run and protocol
    rows = _per_user(root)
    assert rows.num_rows == info["per_user_rows"] == ((U - 1) * 3 + 25) * 2
    keys = set(zip(*(rows.column(c).to_pylist() for c in ("user_id", "run", "protocol"))))
    assert len(keys) == rows.num_rows
    slim = rows.filter(pc.and_(pc.equal(rows.column("run"), "sasrec-slim-teacher-s0"),
                               pc.equal(rows.column("protocol"), "full")))
    assert slim.column("ndcg@10").to_numpy() == pytest.approx(per_user["sasrec-slim-teacher-s0"]["full"]["ndcg@10"],
                                                              abs=1e-12)
    assert set(slim.column("backbone").to_pylist()) == {"sasrec"} and set(slim.column("seed").to_pylist()) == {0}

    # (b) 4 shards instead of 10: the same candidates (drawn again: the shard plan is in the key) and
    # per-user rows; above the Wilcoxon cap its p-value is null with the reason
    m3, info3 = evaluate_all(cfg, wilcoxon_max_users=50)
    assert info3["shards"] == 4 and not m3["sampled"]["reused"]
    users3, cand3 = _candidates(root)
    assert (users3 == users).all() and (cand3 == cand).all()
    rows3 = _per_user(root)
    assert rows3.num_rows == rows.num_rows
    for name in metric_names(KS):
        assert rows3.column(name).to_numpy() == pytest.approx(rows.column(name).to_numpy(), abs=1e-12)
    sig3 = m3["significance"]["sasrec"]["slim:teacher@leaky"]["full"]
    assert sig3["p_wilcoxon"] is None and "89 users > 50" in sig3["wilcoxon_skipped"]
    assert sig3["p_ttest"] == pytest.approx(m["significance"]["sasrec"]["slim:teacher@leaky"]["full"]["p_ttest"], rel=1e-9)

    # nothing changed: the stored candidates are reused, not redrawn
    from slim_ray.rec.stage import run_evaluate

    summary = run_evaluate(cfg)
    assert summary["candidates_reused"] and summary["shards"] == 4 and len(summary["node_ids"]) == 1
    assert summary["per_user_rows"] == rows.num_rows
    assert (_candidates(root)[1] == cand).all()
    # another seed: drawn again, other negatives, the same targets
    other, _ = evaluate_all(load_config(None, [f"run_dir={root}", f"evaluate.num_negatives={NEG}", "evaluate.ks=[5,10]",
                                               "evaluate.candidates_seed=7"]))
    _, cand7 = _candidates(root)
    assert not other["sampled"]["reused"] and (cand7[:, 0] == cand[:, 0]).all() and (cand7[:, 1:] != cand[:, 1:]).any()


TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from slim_ray.config import load_config
from slim_ray.rec.evaluate import evaluate_all

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    cfg = load_config(None, [f"run_dir={sys.argv[1]}", "evaluate.num_negatives=20", "evaluate.ks=[5,10]"])
    _, info = evaluate_all(cfg, shard_users=10)
    print("INFO" + json.dumps(info))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_shards_run_on_both_nodes_of_a_two_node_cluster(root):
    """Two Ray nodes on this machine (a fresh Ray in a subprocess): the 10 shard tasks spread over
    both, and the summary names both nodes."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    out = subprocess.run([sys.executable, "-c", TWO_NODES, root], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(next(ln[4:] for ln in out.stdout.splitlines() if ln.startswith("INFO")))
    assert info["shards"] == 10 and info["per_user_rows"] == ((U - 1) * 3 + 25) * 2
    assert len(set(info["node_ids"])) == 2


def test_paired_t_test_from_sums_equals_scipy():
    rng = np.random.default_rng(0)
    b = rng.random(1000)
    a = b + 0.01 + rng.normal(0, 0.05, 1000)
    # sums of three uneven shards, merged
    cuts = [0, 100, 555, 1000]
    shards = [paired_sums(a[i:j], b[i:j]) for i, j in zip(cuts, cuts[1:])]
    total = add_paired_sums(add_paired_sums(shards[0], shards[1]), shards[2])
    ref = stats.ttest_rel(a, b)
    t, p = paired_t_from_sums(total["n"], total["sum_d"], total["sum_d2"])
    assert t == pytest.approx(ref.statistic, rel=1e-9) and p == pytest.approx(ref.pvalue, rel=1e-9)
    full = paired_test(a, b)
    got = paired_test_from_sums(total)
    for k in ("n_users", "mean_a", "mean_b", "mean_diff", "t_stat", "p_ttest"):
        assert got[k] == pytest.approx(full[k], rel=1e-9), k
    # a negative difference, few users
    t, p = paired_t_from_sums(*(lambda s: (s["n"], s["sum_d"], s["sum_d2"]))(paired_sums(b[:7], a[:7])))
    ref = stats.ttest_rel(b[:7], a[:7])
    assert t == pytest.approx(ref.statistic, rel=1e-9) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert paired_test_from_sums(paired_sums(b, b))["p_ttest"] == 1.0
