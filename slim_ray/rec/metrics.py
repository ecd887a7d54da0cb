"""Ranking metrics, vectorised: one batched matmul per block of users, ranks by comparison.

The rank of the target (0 = top) is the number of other candidates scoring >= the target, so ties
count against the model (a constant scorer gets the worst rank, never a lucky one). This is what a
top-k membership test computes, minus top-k's arbitrary order among ties. From the rank:

    HR@K   = [rank < K]
    NDCG@K = [rank < K] / log2(rank + 2)       (one relevant item, so IDCG = 1)
    MRR@K  = [rank < K] / (rank + 1)
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

METRICS = ("hr", "ndcg", "mrr")


def metric_names(ks: Iterable[int]) -> list[str]:
    return [f"{m}@{k}" for m in METRICS for k in ks]


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, np.ndarray]:
    """Per-user metric arrays from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = hit / np.log2(ranks + 2)
        out[f"mrr@{k}"] = hit / (ranks + 1)
    return out


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in per_user.items()}


def ranks_full(scores, targets, excl_rows=None, excl_cols=None):
    """Full ranking. ``scores`` torch [B, n_items + 1] (column 0 = padding); excluded (history)
    items given as index pairs into this block. Returns torch int64 ranks [B]."""
    import torch

    scores = scores.clone()
    scores[:, 0] = float("-inf")
    if excl_rows is not None and len(excl_rows):
        scores[excl_rows, excl_cols] = float("-inf")
    t = scores.gather(1, targets[:, None])
    return (scores >= t).sum(1) - 1


def ranks_sampled(scores):
    """Sampled ranking: ``scores`` [B, 1 + n_neg] with the target in column 0."""
    return (scores[:, 1:] >= scores[:, :1]).sum(1)


def random_reference(n_candidates: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """Expected metrics of a uniformly random ranker when user u's target is ranked among
    ``n_candidates[u]`` items (target included): averages of the exact expectations."""
    n = np.asarray(n_candidates, dtype=np.float64)
    out = {}
    for k in ks:
        r = np.arange(k, dtype=np.float64)
        for name, gain in (("hr", np.ones(k)), ("ndcg", 1 / np.log2(r + 2)), ("mrr", 1 / (r + 1))):
            # E = (1/n) * sum_{r < min(k, n)} gain(r)
            cum = np.concatenate([[0.0], np.cumsum(gain)])
            out[f"{name}@{k}"] = float(np.mean(cum[np.minimum(k, n).astype(int)] / n))
    return {m: out[m] for m in metric_names(ks)}


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired comparison of per-user metrics a (e.g. SLIM) vs b (baseline), same users in the same
    order: mean difference, paired t-test and Wilcoxon signed-rank p-values (two-sided)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same users: {a.shape} vs {b.shape}")
    diff = a - b
    out = {"n_users": int(len(a)), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
           "mean_diff": float(diff.mean())}
    if np.allclose(diff, 0):
        out.update(t_stat=0.0, p_ttest=1.0, p_wilcoxon=1.0)
        return out
    t = stats.ttest_rel(a, b)
    out["t_stat"] = float(t.statistic)
    out["p_ttest"] = float(t.pvalue)
    out["p_wilcoxon"] = float(stats.wilcoxon(a, b, zero_method="wilcox").pvalue)
    return out


PAIR_SUMS = ("n", "sum_a", "sum_b", "sum_d", "sum_d2")


def paired_sums(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """What a paired t-test needs from one shard of users: n, sums of a, b, d = a - b and d^2, and
    the largest |d| (to tell "no difference at all"). Shards' sums add up (``add_paired_sums``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired sums need the same users: {a.shape} vs {b.shape}")
    d = a - b
    return {"n": int(len(d)), "sum_a": float(a.sum()), "sum_b": float(b.sum()), "sum_d": float(d.sum()),
            "sum_d2": float((d * d).sum()), "max_abs_d": float(np.abs(d).max()) if len(d) else 0.0}


def add_paired_sums(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
    out = {k: x[k] + y[k] for k in PAIR_SUMS}
    out["max_abs_d"] = max(x["max_abs_d"], y["max_abs_d"])
    return out


def paired_t_from_sums(n: int, sum_d: float, sum_d2: float) -> tuple[float, float]:
    """(t statistic, two-sided p-value) of the paired t-test from n, sum of d and sum of d^2 alone
    (what ``scipy.stats.ttest_rel(a, b)`` gives for d = a - b), so per-user differences never need
    to be in one place. t = mean(d) / sqrt(var(d) / n), var with n - 1 degrees of freedom."""
    from scipy import stats

    if n < 2:
        return float("nan"), float("nan")
    mean = sum_d / n
    var = max(sum_d2 - sum_d * mean, 0.0) / (n - 1)
    if var == 0.0:  # every d equal: scipy gives +-inf and p 0 (nan when every d is 0)
        if mean == 0.0:
            return float("nan"), float("nan")
        return math.copysign(math.inf, mean), 0.0
    t = mean / math.sqrt(var / n)
    return float(t), float(2 * stats.t.sf(abs(t), n - 1))


def paired_test_from_sums(s: dict[str, float]) -> dict[str, float]:
    """``paired_test``'s keys (without the Wilcoxon p-value) from merged ``paired_sums``; no
    difference at all (every |d| <= 1e-8, ``np.allclose``'s tolerance) reads t 0, p 1 as there."""
    n = int(s["n"])
    out = {"n_users": n, "mean_a": s["sum_a"] / n, "mean_b": s["sum_b"] / n, "mean_diff": s["sum_d"] / n}
    if s["max_abs_d"] <= 1e-8:
        out.update(t_stat=0.0, p_ttest=1.0)
        return out
    out["t_stat"], out["p_ttest"] = paired_t_from_sums(n, s["sum_d"], s["sum_d2"])
    return out


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired a vs b (zero differences dropped). It ranks
    every |a - b|, so unlike the t-test it cannot be computed from per-shard sums."""
    from scipy import stats

    return float(stats.wilcoxon(a, b, zero_method="wilcox").pvalue)


def evaluate_vectors(users_vec, item_table, split, ks, candidates: Optional[np.ndarray] = None,
                     batch_users: int = 1024) -> dict[str, dict[str, np.ndarray]]:
    """Per-user metrics of user vectors [U, d] against the item table [n_items + 1, d] (torch).

    ``split`` is a ``slim_ray.rec.data.EvalSplit`` (targets + history to exclude);
    ``candidates`` [U, 1 + n_neg] (target first) enables the sampled protocol.
    Returns {"full": {...}, "sampled": {...}} (only the protocols asked for).
    """
    import torch

    U = users_vec.shape[0]
    targets = torch.as_tensor(split.targets)
    rows = np.asarray(split.excl_rows)
    cols = np.asarray(split.excl_cols)
    # rows are sorted by user (eval_split builds them in user order): slice per block.
    bounds = np.searchsorted(rows, np.arange(0, U + batch_users, batch_users))
    full_ranks, samp_ranks = [], []
    for bi, start in enumerate(range(0, U, batch_users)):
        stop = min(U, start + batch_users)
        u = users_vec[start:stop]
        scores = u @ item_table.T
        lo, hi = bounds[bi], bounds[bi + 1]
        r = torch.as_tensor(rows[lo:hi] - start)
        c = torch.as_tensor(cols[lo:hi])
        full_ranks.append(ranks_full(scores, targets[start:stop].to(scores.device), r, c).cpu())
        if candidates is not None:
            cand = torch.as_tensor(candidates[start:stop]).to(scores.device)
            samp_ranks.append(ranks_sampled(scores.gather(1, cand)).cpu())
    out = {"full": metrics_from_ranks(torch.cat(full_ranks).numpy(), ks)}
    if candidates is not None:
        out["sampled"] = metrics_from_ranks(torch.cat(samp_ranks).numpy(), ks)
    return out
