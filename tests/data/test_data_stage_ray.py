"""The prepare stage on Ray: MovieLens-100K from the package, and synth -> Amazon JSON -> prepare."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.compute as pc
import pytest

from slim_ray.config import load_config
from slim_ray.data.io import read_items, read_sequences
from slim_ray.data.prepare import prepare_tables
from slim_ray.data.readers import build_specs, read_local
from slim_ray.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from slim_ray.data.stage import input_files
from slim_ray.stages import StageFailed, run_stage


def reference(cfg):
    d = cfg.data
    si, sm = build_specs(d, *input_files(d))
    inter, _, _ = read_local(si)
    meta = read_local(sm)[0] if sm else None
    return prepare_tables(
        inter, meta, min_user_count=d.min_user_count, min_item_count=d.min_item_count, max_seq_len=d.max_seq_len,
        max_users=d.max_users, min_rating=d.min_rating, dedup=d.dedup,
        item_kwargs=dict(fields=tuple(d.text_fields), category_label="Genres" if d.source == "movielens" else "Categories"),
    )


def test_prepare_movielens_100k_on_ray(ray_session, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.num_buckets=2", "data.chunk_mb=1"])
    res = run_stage("prepare", cfg)
    s = res["summary"]
    # MovieLens-100K, 5-core: every user survives, 333 rare movies go
    assert (s["raw"]["interactions"], s["raw"]["users"], s["raw"]["items"]) == (100_000, 943, 1682)
    assert (s["users"], s["items"], s["interactions"]) == (943, 1349, 99_287)
    assert s["skipped_lines"] == 0 and s["kcore_passes"] == 2
    import ray

    assert s["node_ids"] == [ray.get_runtime_context().get_node_id()]  # the one local node wrote the parts
    items, seqs = read_items(cfg.layout.items), read_sequences(cfg.layout.sequences)
    assert items.schema.equals(ITEMS_SCHEMA, check_metadata=False)
    assert seqs.schema.equals(SEQUENCES_SCHEMA, check_metadata=False)
    assert sorted(items.column("item_id").to_pylist()) == list(range(1, 1350))
    assert sorted(seqs.column("user_id").to_pylist()) == list(range(1, 944))
    lengths = pc.list_value_length(seqs.column("item_ids")).to_numpy()
    assert lengths.min() >= 3 and lengths.max() == 200 and int(lengths.sum()) == s["interactions_kept"]
    toy = items.filter(pc.equal(items.column("item_key"), "1")).to_pylist()[0]
    assert toy["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy." and toy["year"] == 1995
    # the Ray stage and the single-process reference agree exactly
    ref_items, ref_seqs, _ = reference(cfg)
    assert items.sort_by("item_id").equals(ref_items)
    assert seqs.sort_by("user_id").equals(ref_seqs.sort_by("user_id"))
    for r in seqs.to_pylist():
        assert r["timestamps"] == sorted(r["timestamps"])
    assert json.load(open(os.path.join(cfg.layout.prepared, "manifest.json")))["status"] == "complete"


def test_synth_amazon_then_prepare_with_bad_lines(ray_session, tmp_path):
    from slim_ray.cli import main as cli_main

    out = tmp_path / "synth"
    assert cli_main(["synth", "--out", str(out), "--set", "synth.num_users=400", "synth.num_items=300",
                     "synth.num_shards=2", "synth.dup_rate=0.05"]) == 0
    summary = json.load(open(out / "synth.json"))["summary"]
    assert summary["users"] == 400 and summary["items"] == 300
    assert sorted(os.listdir(out / "reviews")) == ["part-00000.json", "part-00001.json"]
    bad_file = out / "reviews" / "part-00001.json"
    n_lines = sum(1 for _ in open(bad_file))
    with open(bad_file, "a") as f:
        f.write('{"reviewerID": "AX", "asin": "B000012345", "unixReviewTime": "yesterday"}\n')
    base = [f"run_dir={tmp_path / 'run'}", "data.source=amazon", f"data.interactions={out / 'reviews'}",
            f"data.items={out / 'meta'}", "data.dedup=true", "data.num_buckets=2"]
    with pytest.raises(StageFailed) as err:
        run_stage("prepare", load_config(None, base))
    msg = str(err.value)
    assert f"part-00001.json: line {n_lines + 1}: field 'unixReviewTime': 'yesterday' is not a number" in msg
    assert "Traceback" not in msg
    cfg = load_config(None, base + ["data.on_bad_lines=skip"])
    s = run_stage("prepare", cfg)["summary"]
    assert s["skipped_lines"] == 1 and f"line {n_lines + 1}" in s["skipped_examples"][0]
    assert s["raw"]["interactions"] == summary["interactions"]
    assert s["after_filters"]["interactions"] < s["raw"]["interactions"]  # duplicates dropped
    ref_items, ref_seqs, ref = reference(cfg)
    seqs = read_sequences(cfg.layout.sequences).sort_by("user_id")
    assert seqs.equals(ref_seqs.sort_by("user_id")) and read_items(cfg.layout.items).equals(ref_items)
    assert s["users"] == ref["users"] > 300 and np.all(pc.list_value_length(seqs.column("item_ids")).to_numpy() >= 5)
