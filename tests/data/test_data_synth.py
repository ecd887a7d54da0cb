"""Synthetic logs: Zipf popularity, lengths, distinct items, time order, files the readers accept."""

from __future__ import annotations

import os

import numpy as np

from slim_ray.data.config import PrepareConfig, SynthConfig
from slim_ray.data.readers import build_specs, expand_paths, read_local
from slim_ray.data.synth import generate_users, write_meta_shard, write_review_shard, zipf_head_share


def test_zipf_popularity_and_lengths():
    cfg = SynthConfig(num_users=20_000, num_items=20_000, mean_length=12, zipf_exponent=1.0, min_length=5,
                      max_length=200)
    g = generate_users(cfg, 0, 0, cfg.num_users)
    counts = np.bincount(g["user"], minlength=cfg.num_users)
    assert counts.min() >= 5 and counts.max() <= 200
    assert abs(counts.mean() - 12) < 0.6  # oversampling keeps lengths after dropping repeats
    assert np.percentile(counts, 99) > 3 * np.median(counts)  # heavy tail
    # rank-frequency slope on ranks 10..1000 ~ -s (the top ranks lose a little to per-user dedup)
    freq = np.sort(np.bincount(g["item"], minlength=cfg.num_items))[::-1].astype(float)
    ranks = np.arange(10, 1000)
    slope = np.polyfit(np.log(ranks + 1), np.log(freq[ranks]), 1)[0]
    assert -1.15 < slope < -0.85, slope
    head = freq[: cfg.num_items // 100].sum() / freq.sum()
    expected = zipf_head_share(cfg.num_items, 1.0, 0.01)
    assert 0.8 * expected < head <= expected + 0.01, (head, expected)
    # distinct items per user, times non-decreasing per user, day resolution, inside the window
    key = g["user"] * cfg.num_items + g["item"]
    assert len(np.unique(key)) == len(key)
    same_user = g["user"][1:] == g["user"][:-1]
    assert (np.diff(g["ts"])[same_user] >= 0).all()
    assert (g["ts"] % 86400 == 0).all() and g["ts"].min() >= cfg.start_time - 86400 and g["ts"].max() <= cfg.end_time


def test_shards_are_deterministic_and_readable_as_amazon(tmp_path):
    cfg = SynthConfig(num_users=300, num_items=200, out=str(tmp_path / "a"), seed=5, dup_rate=0.1)
    r = write_review_shard(cfg, 0, 0, 300)
    n_meta = write_meta_shard(cfg, 0, 0, 200)
    cfg2 = cfg.model_copy(update={"out": str(tmp_path / "b")})
    write_review_shard(cfg2, 0, 0, 300)
    a = open(tmp_path / "a" / "reviews" / "part-00000.json", "rb").read()
    assert a == open(tmp_path / "b" / "reviews" / "part-00000.json", "rb").read()
    pcfg = PrepareConfig(source="amazon", interactions=str(tmp_path / "a" / "reviews"),
                         items=str(tmp_path / "a" / "meta"))
    si, sm = build_specs(pcfg, expand_paths(pcfg.interactions, "i"), expand_paths(pcfg.items, "m"))
    t, skipped, _ = read_local(si)
    m, _, _ = read_local(sm)
    assert skipped == 0 and t.num_rows == r["interactions"] and m.num_rows == n_meta == 200
    assert t.column("user_key").to_pylist()[0].startswith("A") and len(t.column("item_key")[0].as_py()) == 10
    row = m.to_pylist()[0]
    assert row["categories"][0] == "Video Games" and row["title"] and row["description"]
    # dup_rate adds exact duplicate (user, item, time) rows
    keys = list(zip(t.column("user_key").to_pylist(), t.column("item_key").to_pylist(),
                    t.column("timestamp").to_pylist()))
    assert len(keys) - len(set(keys)) > 10


def test_parquet_format_uses_the_tabular_names(tmp_path):
    cfg = SynthConfig(num_users=50, num_items=100, out=str(tmp_path), format="parquet")
    write_review_shard(cfg, 0, 0, 50)
    write_meta_shard(cfg, 0, 0, 100)
    assert os.path.exists(tmp_path / "reviews" / "part-00000.parquet")
    pcfg = PrepareConfig(source="tabular", interactions=str(tmp_path / "reviews"), items=str(tmp_path / "meta"))
    si, sm = build_specs(pcfg, expand_paths(pcfg.interactions, "i"), expand_paths(pcfg.items, "m"))
    t, _, _ = read_local(si)
    m, _, _ = read_local(sm)
    assert t.num_rows > 250 and m.num_rows == 100 and m.column("categories")[0].as_py()[0] == "Video Games"
