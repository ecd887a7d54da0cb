"""``slim-ray synth``: synthetic review logs at scale, so large runs need no download.

    slim-ray synth --set synth.num_users=1000000 synth.out=/data/synth [synth.format=parquet]

Writes ``<out>/reviews/part-XXXXX.json`` (Amazon Reviews 2018 JSON lines: reviewerID, asin,
overall, unixReviewTime, reviewTime, verified, summary) and ``<out>/meta/part-XXXXX.json`` (asin,
title, brand, category list, description), or the same as Parquet with the tabular column names
(user_id, item_id, rating, timestamp / item_id, title, brand, categories, description), plus
``<out>/synth.json`` with the generated counts.

The model of the log:
- item popularity is Zipf: P(item of popularity rank r) ~ r^-s (``zipf_exponent``), ranks are a
  seeded permutation of the catalogue, so popular items are spread over ids;
- per-user lengths are ``min_length`` + lognormal (heavy tail, mean ``mean_length``) or geometric,
  capped at ``max_length``; a user's items are distinct (repeat draws are dropped);
- a user's reviews follow exponential gaps from a random start, at day resolution like the real
  ``unixReviewTime`` (so equal timestamps are common, as in the real data);
- titles/categories/brands come from the vocabularies in ``SynthConfig``.

Every shard is one Ray task with its own seed (seed, shard): the output does not depend on how many
workers run, and memory per task is bounded by the shard size.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from typing import Any

import numpy as np

USERS_PER_SHARD = 50_000
ITEMS_PER_SHARD = 200_000
DAY = 86_400


def num_items(cfg) -> int:
    return cfg.num_items or max(100, cfg.num_users // 10)


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -s
    return p / p.sum()


def zipf_head_share(n: int, s: float, fraction: float) -> float:
    """Expected share of draws that hit the top ``fraction`` of items (before per-user dedup)."""
    p = zipf_probabilities(n, s)
    return float(p[: max(1, int(round(n * fraction)))].sum())


def _popularity_rank(cfg) -> np.ndarray:
    """item index -> popularity rank (0 = most popular); a seeded permutation."""
    return np.random.default_rng([cfg.seed, 7]).permutation(num_items(cfg))


def user_key(idx: np.ndarray) -> list[str]:
    # A bijection of [0, 16^13) so keys look random but never collide.
    return [f"A{v:013X}" for v in ((idx.astype(np.int64) * 0x9E3779B1 + 0x5BD1E995) % (16 ** 13))]


def item_key(idx: np.ndarray) -> list[str]:
    return [f"B{v:09d}" for v in ((idx.astype(np.int64) * 982_451_653 + 12_345) % 1_000_000_000)]


def sample_lengths(cfg, rng: np.random.Generator, n: int) -> np.ndarray:
    extra_mean = max(cfg.mean_length - cfg.min_length, 0.01)
    if cfg.length_distribution == "lognormal":
        mu = np.log(extra_mean) - cfg.length_sigma ** 2 / 2
        extra = rng.lognormal(mu, cfg.length_sigma, n)
    else:
        extra = rng.geometric(1.0 / (1.0 + extra_mean), n) - 1
    return np.clip(np.round(cfg.min_length + extra), cfg.min_length, cfg.max_length).astype(np.int64)


def generate_users(cfg, shard: int, first_user: int, n_users: int) -> dict[str, np.ndarray]:
    """Interactions of users [first_user, first_user + n_users): arrays user, item, ts, rating."""
    rng = np.random.default_rng([cfg.seed, 1, shard])
    n_it = num_items(cfg)
    lengths = sample_lengths(cfg, rng, n_users)
    draws = np.minimum(lengths + lengths // 2 + 3, n_it)  # oversample: repeats are dropped below
    total = int(draws.sum())
    users = np.repeat(np.arange(first_user, first_user + n_users, dtype=np.int64), draws)
    # Zipf draw by popularity rank, then map rank -> item index through the seeded permutation
    cdf = np.cumsum(zipf_probabilities(n_it, cfg.zipf_exponent))
    ranks = np.minimum(np.searchsorted(cdf, rng.random(total) * cdf[-1], side="right"), n_it - 1)
    rank_to_item = np.argsort(_popularity_rank(cfg))
    items = rank_to_item[ranks]
    # distinct items per user, in draw order, at most `lengths[user]` of them
    key = users * n_it + items
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(total, bool)
    keep[first] = True
    rank_in_user = np.cumsum(keep) - np.repeat(np.r_[0, np.cumsum(keep)[np.cumsum(draws)[:-1] - 1]], draws) - 1
    keep &= rank_in_user < np.repeat(lengths, draws)
    users, items = users[keep], items[keep]
    # times: per-user start + exponential gaps (a user's span ~ a third of the window on average),
    # at day resolution; the draw order is the time order
    span = cfg.end_time - cfg.start_time
    n = len(users)
    counts = np.bincount(users - first_user, minlength=n_users)  # >= 1: the first draw is always kept
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    gaps = rng.exponential(1.0, n) * np.repeat(span / 3.0 / counts, counts)
    csum = np.cumsum(gaps)
    rel = csum - np.repeat(csum[starts] - gaps[starts], counts)
    last = rel[starts + counts - 1]
    user_start = cfg.start_time + rng.random(n_users) * np.maximum(span - last, 0.0)
    ts = np.minimum(np.repeat(user_start, counts) + rel, cfg.end_time)
    ts = (ts // DAY * DAY).astype(np.int64)
    rating = rng.choice(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), n, p=[0.06, 0.05, 0.1, 0.2, 0.59])
    if cfg.dup_rate > 0:  # exact duplicate rows (a user's first review twice), as real logs have
        dup_rows = starts[rng.random(n_users) < cfg.dup_rate]
        take = np.sort(np.r_[np.arange(n), dup_rows], kind="stable")
        users, items, ts, rating = users[take], items[take], ts[take], rating[take]
    return {"user": users, "item": items, "ts": ts, "rating": rating}


_SUMMARIES = ["Great game", "Five Stars", "Fun", "Works great", "Disappointing", "Love it",
              "Not bad", "As described", "Four Stars", "Awesome"]


def _pick(words, idx) -> "pa.Array":
    """``words[idx]`` as an Arrow string array (a vectorised take, no per-row Python)."""
    import pyarrow as pa

    return pa.array(list(words), pa.string()).take(pa.array(np.asarray(idx, dtype=np.int64)))


_MONTHS = [f"{m:02d}" for m in range(1, 13)]
_STARS = [f"{r:.1f}" for r in range(6)]


def _review_lines(rating, verified, ts, user_idx, user_words, item_idx, item_words, summ) -> bytes:
    """JSON lines of reviews, formatted column-wise with Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def num(x) -> pa.Array:
        return pa.array(np.asarray(x, dtype=np.int64)).cast(pa.string())

    days = np.asarray(ts, dtype="datetime64[s]").astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    year = months.astype("datetime64[Y]").astype(np.int64) + 1970
    day = (days - months).astype(np.int64) + 1
    parts = [
        '{"overall": ', _pick(_STARS, np.asarray(rating).astype(np.int64)),
        ', "verified": ', _pick(["false", "true"], np.asarray(verified).astype(np.int64)),
        ', "reviewTime": "', _pick(_MONTHS, months.astype(np.int64) % 12), " ", num(day), ", ", num(year),
        '", "reviewerID": "', user_words.take(pa.array(user_idx)), '", "asin": "', item_words.take(pa.array(item_idx)),
        '", "summary": "', _pick(_SUMMARIES, summ), '", "unixReviewTime": ', num(ts), "}\n",
    ]
    lines = pc.binary_join_element_wise(*parts, "")
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    _, offsets, data = lines.buffers()
    offs = np.frombuffer(offsets, dtype=np.int32)[lines.offset: lines.offset + len(lines) + 1]
    return data.to_pybytes()[offs[0]: offs[-1]]


def _open_text(path: str, compress: bool):
    return gzip.open(path, "wt", encoding="utf-8", compresslevel=1) if compress else open(path, "w", encoding="utf-8")


def _open_binary(path: str, compress: bool):
    return gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")


def write_review_shard(cfg, shard: int, first_user: int, n_users: int) -> dict[str, int]:
    """Generate and write one shard of reviews (called in a Ray task)."""
    g = generate_users(cfg, shard, first_user, n_users)
    # Real review files are grouped by product: order rows by item, then time (stable)
    order = np.lexsort((g["ts"], g["item"]))
    import pyarrow as pa

    user_words = pa.array(user_key(np.arange(first_user, first_user + n_users)), pa.string())
    item_words = pa.array(item_key(np.arange(num_items(cfg))), pa.string())
    uidx, iidx = g["user"][order] - first_user, g["item"][order]
    ts, rating = g["ts"][order], g["rating"][order]
    os.makedirs(os.path.join(cfg.out, "reviews"), exist_ok=True)
    n = len(order)
    if cfg.format == "parquet":
        import pyarrow.parquet as pq

        t = pa.table({"user_id": user_words.take(pa.array(uidx)), "item_id": item_words.take(pa.array(iidx)),
                      "rating": pa.array(rating), "timestamp": pa.array(ts, pa.int64())})
        path = os.path.join(cfg.out, "reviews", f"part-{shard:05d}.parquet")
        pq.write_table(t, path + ".tmp", row_group_size=1 << 20)
        os.replace(path + ".tmp", path)
    else:
        rng = np.random.default_rng([cfg.seed, 2, shard])
        summ = rng.integers(0, len(_SUMMARIES), n)
        verified = rng.random(n) < 0.8
        path = os.path.join(cfg.out, "reviews", f"part-{shard:05d}.json" + (".gz" if cfg.compress else ""))
        with _open_binary(path + ".tmp", cfg.compress) as f:
            for lo in range(0, n, 200_000):  # vectorised formatting, 200k lines at a time
                hi = min(n, lo + 200_000)
                f.write(_review_lines(rating[lo:hi], verified[lo:hi], ts[lo:hi], uidx[lo:hi], user_words,
                                      iidx[lo:hi], item_words, summ[lo:hi]))
        os.replace(path + ".tmp", path)
    lengths = np.bincount(g["user"] - first_user, minlength=n_users)
    hist = np.bincount(g["item"], minlength=num_items(cfg))
    return {"interactions": int(n), "users": int(n_users), "item_counts": hist, "lengths": lengths}


def item_metadata(cfg, first_item: int, n: int) -> list[dict[str, Any]]:
    """Metadata of items [first_item, first_item + n) (deterministic per item)."""
    out = []
    cats, brands, words = cfg.categories, cfg.brands, cfg.title_words
    for idx in range(first_item, first_item + n):
        r = np.random.default_rng([cfg.seed, 3, idx])
        k = int(r.integers(2, 5))
        title = " ".join(words[j] for j in r.choice(len(words), k, replace=False))
        if r.random() < 0.3:
            title += f" {int(r.integers(2, 6))}"
        leaf = [cats[j] for j in r.choice(len(cats), int(r.integers(1, 3)), replace=False)]
        brand = brands[int(r.zipf(1.6) - 1) % len(brands)] if r.random() < 0.9 else ""
        year = int(r.integers(1995, 2019))
        out.append({
            "asin": item_key(np.array([idx]))[0],
            "title": title,
            "brand": brand,
            "category": [cfg.root_category] + leaf,
            "description": [f"{title} by {brand or 'an independent studio'}, released {year}."],
        })
    return out


def write_meta_shard(cfg, shard: int, first_item: int, n: int) -> int:
    rows = item_metadata(cfg, first_item, n)
    os.makedirs(os.path.join(cfg.out, "meta"), exist_ok=True)
    if cfg.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pa.table({
            "item_id": [r["asin"] for r in rows], "title": [r["title"] for r in rows],
            "brand": [r["brand"] or None for r in rows], "categories": [r["category"] for r in rows],
            "description": [r["description"][0] for r in rows],
        })
        path = os.path.join(cfg.out, "meta", f"part-{shard:05d}.parquet")
        pq.write_table(t, path + ".tmp")
    else:
        path = os.path.join(cfg.out, "meta", f"part-{shard:05d}.json" + (".gz" if cfg.compress else ""))
        with _open_text(path + ".tmp", cfg.compress) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(path + ".tmp", path)
    return len(rows)


def run_synth(cfg, ray_cfg=None, progress: bool = True) -> dict[str, Any]:
    """Generate the whole log with one Ray task per shard; returns (and writes) the counts."""
    import ray

    from slim_ray.runtime import init_ray

    init_ray(ray_cfg)
    t0 = time.time()
    n_it = num_items(cfg)
    n_shards = cfg.num_shards or max(1, -(-cfg.num_users // USERS_PER_SHARD))
    bounds = np.linspace(0, cfg.num_users, n_shards + 1).astype(np.int64)
    for sub in ("reviews", "meta"):
        d = os.path.join(cfg.out, sub)
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.startswith("part-"):
                    os.remove(os.path.join(d, f))
    review = ray.remote(write_review_shard).options(num_cpus=1)
    meta = ray.remote(write_meta_shard).options(num_cpus=1)
    pending = [review.remote(cfg, s, int(bounds[s]), int(bounds[s + 1] - bounds[s])) for s in range(n_shards)]
    m_shards = max(1, -(-n_it // ITEMS_PER_SHARD))
    mb = np.linspace(0, n_it, m_shards + 1).astype(np.int64)
    meta_refs = [meta.remote(cfg, s, int(mb[s]), int(mb[s + 1] - mb[s])) for s in range(m_shards)]
    item_counts = np.zeros(n_it, np.int64)
    lengths = []
    interactions, done = 0, 0
    while pending:  # aggregate as shards finish: the driver holds one shard's counts at a time
        ready, pending = ray.wait(pending, num_returns=1)
        r = ray.get(ready[0])
        item_counts += r["item_counts"]
        lengths.append(r["lengths"])
        interactions += r["interactions"]
        done += 1
        if progress:
            print(f"\r[synth] shards {done}/{n_shards}, {interactions:,} interactions", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    n_meta = sum(ray.get(meta_refs))
    lengths_all = np.concatenate(lengths)
    top = np.sort(item_counts)[::-1]
    k1 = max(1, int(round(n_it * 0.01)))
    summary = {
        "format": cfg.format,
        "out": os.path.abspath(cfg.out),
        "users": int(cfg.num_users),
        "items": int(n_meta),
        "interactions": int(interactions),
        "shards": int(n_shards),
        "length_mean": round(float(lengths_all.mean()), 2),
        "length_median": float(np.median(lengths_all)),
        "length_p99": float(np.percentile(lengths_all, 99)),
        "length_max": int(lengths_all.max()),
        "top1pct_item_share": round(float(top[:k1].sum() / max(1, interactions)), 4),
        "top1pct_item_share_zipf": round(zipf_head_share(n_it, cfg.zipf_exponent, 0.01), 4),
        "items_with_interactions": int((item_counts > 0).sum()),
        "seconds": round(time.time() - t0, 2),
    }
    with open(os.path.join(cfg.out, "synth.json"), "w") as f:
        json.dump({"config": cfg.model_dump(mode="json"), "summary": summary}, f, indent=2)
    return summary
