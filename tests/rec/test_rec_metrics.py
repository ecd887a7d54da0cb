"""Metric functions against hand-computed values; the random-ranker oracle; drawn candidates."""

import math

import numpy as np
import pytest
import torch

from slim_ray.rec import data as rd
from slim_ray.rec.evaluate import draw_candidates
from slim_ray.rec.metrics import (
    evaluate_vectors, metrics_from_ranks, paired_test, random_reference, ranks_full, ranks_sampled,
)


def test_metrics_from_ranks_hand_computed():
    m = metrics_from_ranks(np.array([0, 1, 4, 9, 10, 19, 25]), [5, 10, 20])
    assert m["hr@5"].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert m["hr@10"].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert m["hr@20"].tolist() == [1, 1, 1, 1, 1, 1, 0]
    assert m["ndcg@10"] == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0, 0, 0])
    assert m["mrr@20"] == pytest.approx([1.0, 0.5, 0.2, 0.1, 1 / 11, 1 / 20, 0])
    assert m["mrr@5"] == pytest.approx([1.0, 0.5, 0.2, 0, 0, 0, 0])


def test_full_ranking_excludes_history_and_counts_ties_against_the_model():
    # items 1..5 (column 0 = padding). User 0: target 3, history {1} excluded; user 1: target 2, tie with 4.
    scores = torch.tensor([[9.0, 10.0, 1.0, 5.0, 2.0, 7.0],
                           [9.0, 0.0, 4.0, 3.0, 4.0, 1.0]])
    ranks = ranks_full(scores, torch.tensor([3, 2]), torch.tensor([0]), torch.tensor([1]))
    assert ranks.tolist() == [1, 1]  # user 0: only item 5 beats 3 once item 1 is excluded; user 1: tie
    assert ranks_sampled(torch.tensor([[0.5, 0.1, 0.9, 0.5]])).tolist() == [2]


def test_evaluate_vectors_matches_a_python_loop():
    g = torch.Generator().manual_seed(0)
    U, N, d = 37, 50, 8
    users, table = torch.randn(U, d, generator=g), torch.randn(N + 1, d, generator=g)
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, N + 1), size=rng.integers(4, 12), replace=False) for _ in range(U)]
    data = rd.RecData(np.arange(1, U + 1), seqs, N, U)
    split = rd.eval_split(data, "test", 20)
    cand = draw_candidates(data, 10, seed=1)
    out = evaluate_vectors(users, table, split, [5, 10], cand, batch_users=8)
    for u in range(U):
        s = (users[u] @ table.T).numpy()
        hist = set(seqs[u][:-1].tolist())
        t = seqs[u][-1]
        allowed = [i for i in range(1, N + 1) if i not in hist]
        rank = sum(s[i] >= s[t] for i in allowed) - 1
        assert out["full"]["ndcg@10"][u] == pytest.approx((rank < 10) / math.log2(rank + 2))
        srank = sum(s[i] >= s[t] for i in cand[u][1:])
        assert out["sampled"]["hr@5"][u] == float(srank < 5)


def test_random_ranker_reference_and_simulation_on_sampled_100():
    ref = random_reference(np.full(10, 101), [10, 20])
    assert ref["ndcg@10"] == pytest.approx(0.0454, abs=5e-4)
    assert ref["hr@10"] == pytest.approx(10 / 101)
    assert ref["hr@20"] == pytest.approx(20 / 101)
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.random((20000, 101)))
    m = metrics_from_ranks(ranks_sampled(scores).numpy(), [10, 20])
    assert m["ndcg@10"].mean() == pytest.approx(0.045, abs=0.003)
    assert m["hr@10"].mean() == pytest.approx(0.099, abs=0.006)
    assert m["hr@20"].mean() == pytest.approx(0.198, abs=0.008)


def test_candidates_avoid_history_and_are_seeded_per_user():
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, 301), size=rng.integers(5, 120), replace=False) for _ in range(50)]
    data = rd.RecData(np.arange(1, 51), seqs, 300, 50)
    cand = draw_candidates(data, 100, seed=7)
    assert cand.shape == (50, 101)
    for s, c in zip(seqs, cand):
        assert c[0] == s[-1]
        assert len(set(c[1:])) == 100 and not set(c[1:]) & set(s.tolist())
    assert (draw_candidates(data, 100, seed=7) == cand).all()
    # a user's negatives depend on (seed, user_id) only: not on the other users drawn with it
    alone = draw_candidates(rd.RecData(data.user_ids[10:11], seqs[10:11], 300, 50), 100, seed=7)
    assert (alone[0] == cand[10]).all()
    assert not (draw_candidates(data, 100, seed=8)[:, 1:] == cand[:, 1:]).all()
    # storing and reusing them: tests/rec/test_rec_eval_sharded.py


def test_paired_test_detects_a_consistent_gain():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    res = paired_test(b + 0.05 + rng.normal(0, 0.01, 500), b)
    assert res["mean_diff"] == pytest.approx(0.05, abs=0.005)
    assert res["p_ttest"] < 1e-6 and res["p_wilcoxon"] < 1e-6
    assert paired_test(b, b)["p_ttest"] == 1.0


def _parity_bench():
    """bench/parity_recbole.py, imported by path (it scores RecBole's model on our protocol)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "parity_recbole.py")
    spec = importlib.util.spec_from_file_location("parity_recbole", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FixedScores:
    """Stands in for a RecBole sequential model: fixed scores, and it records the input it got."""
    max_seq_length, ITEM_SEQ, ITEM_SEQ_LEN, training = 3, "item_id_list", "item_length", False

    def __init__(self, scores):
        self.scores, self.seen = scores, None

    def eval(self):
        pass

    def train(self, mode=True):
        pass

    def full_sort_predict(self, inter):
        self.seen = (inter[self.ITEM_SEQ].tolist(), inter[self.ITEM_SEQ_LEN].tolist())
        return self.scores.clone()


def test_parity_bench_scores_recbole_models_on_our_protocol():
    bench = _parity_bench()
    # items 1..5 (column 0 = padding); user 0: 1 2 3 | 4, user 1: 5 1 | 2 (history | test target)
    seqs = [[1, 2, 3, 4], [5, 1, 2]]
    scores = torch.tensor([[9.0, 5, 8, 0.1, 3, 4], [0.0, 1, 2, 7, 6, 9]])
    model = _FixedScores(scores)
    ours = bench.protocol_metrics(model, seqs, "test", exclude_history=True)
    assert model.seen == ([[1, 2, 3], [5, 1, 0]], [3, 2])  # right-padded history, last max_len items
    # history excluded: user 0 ranks 4 (3.0) below 5 (4.0): rank 1; user 1 ranks 2 below 3 and 4: rank 2
    assert ours["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2) and ours["hr@10"] == 1.0
    # RecBole's protocol (history ranked too): rank 3 for both users
    theirs = bench.protocol_metrics(model, seqs, "test", exclude_history=False)
    assert theirs["ndcg@10"] == pytest.approx(1 / math.log2(5))

    # on random data it gives what an independent loop over the users gives (rank among the items
    # outside the history, ties against the model)
    rng = np.random.default_rng(0)
    n_items, users = 40, 30
    long_seqs = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(4, 12), replace=False) for _ in range(users)]
    scores = torch.randn(users, n_items + 1)
    ndcg, hr = [], []
    for u, s in enumerate(long_seqs):
        hist, target = set(s[:-2].tolist()), int(s[-2])  # the valid split: history s[:-2], target s[-2]
        sc = scores[u].tolist()
        rank = sum(1 for i in range(1, n_items + 1) if i not in hist and i != target and sc[i] >= sc[target])
        ndcg.append(1 / math.log2(rank + 2) if rank < 10 else 0.0)
        hr.append(float(rank < 10))
    got = bench.protocol_metrics(_FixedScores(scores), [s.tolist() for s in long_seqs], "valid", exclude_history=True)
    assert got["ndcg@10"] == pytest.approx(np.mean(ndcg))
    assert got["hr@10"] == pytest.approx(np.mean(hr))
    assert 0 < np.mean(hr) < 1  # the data leaves room for a wrong answer either way


def test_slim_effect_bench_pairs_seed_means_against_baseline_and_leaky(tmp_path):
    """bench/slim_effect.py on per-user rows written in evaluate's layout: seed means, the better
    baseline chosen per protocol, and consistent vs leaky paired on the same users."""
    import importlib.util
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "slim_effect.py")
    spec = importlib.util.spec_from_file_location("slim_effect", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    rng = np.random.default_rng(0)
    n = 200
    base = rng.uniform(0, 0.2, n)
    level = {"id": 0.0, "id_text": 0.01, "slim:student": 0.03, "slim:student@leaky": -0.02}
    rows = []
    for var, shift in level.items():
        for seed in (0, 1):
            noise = rng.normal(0, 0.001, n)
            rows.append(pa.table({"user_id": np.arange(n, dtype=np.int64), "backbone": ["sasrec"] * n,
                                  "variant": [var] * n, "seed": np.full(n, seed, np.int64),
                                  "protocol": ["full"] * n, "ndcg@10": base + shift + noise}))
    folder = tmp_path / "run" / "eval" / "per_user"
    folder.mkdir(parents=True)
    for i, t in enumerate(rows):
        pq.write_table(t.take(rng.permutation(n)), folder / f"part-{i}.parquet")  # any row order
    out = mod.effect_rows(mod.per_user(str(folder), "ndcg@10"), "full")
    by = {r["variant"]: r for r in out}
    assert [r["variant"] for r in out] == ["id", "id_text", "slim:student", "slim:student@leaky"]
    assert by["id"]["seeds"] == 2 and "vs_baseline" not in by["id"]
    slim = by["slim:student"]
    assert slim["vs_baseline"]["baseline"] == "id_text"
    assert slim["vs_baseline"]["mean_diff"] == pytest.approx(0.02, abs=0.001) and slim["vs_baseline"]["p_ttest"] < 1e-6
    assert slim["consistent_vs_leaky"]["mean_diff"] == pytest.approx(0.05, abs=0.001)
    assert by["slim:student@leaky"]["vs_baseline"]["mean_diff"] == pytest.approx(-0.03, abs=0.001)
    assert "consistent_vs_leaky" not in by["slim:student@leaky"]
    table = mod.markdown(out, "full", "ndcg@10")
    assert "| sasrec | slim:student | 2 | " in table and "vs id_text" in table
    assert f"| {100 * slim['consistent_vs_leaky']['mean_diff']:+.2f} |" in table
