"""Encode stage: the real packaged encoder on a tiny run folder (contract, resume, dedup, inputs)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slim_ray.config import load_config
from slim_ray.data.io import read_table
from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, check_columns, embeddings_schema
from slim_ray.encode import store
from slim_ray.encode.encoder import encode_texts

ITEM_TEXTS = {
    1: "Star Wars (1977). Genres: Action, Adventure, Sci-Fi, War.",
    2: "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    3: "Sleepless in Seattle (1993). Genres: Comedy, Romance.",
    4: "Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller.",
    5: "Fargo (1996). Genres: Crime, Drama, Thriller.",
}


def _items_table(texts: dict[int, str]) -> pa.Table:
    ids = sorted(texts)
    return pa.Table.from_pydict(
        {
            "item_id": ids,
            "item_key": [str(i) for i in ids],
            "title": [texts[i].split(".")[0] for i in ids],
            "categories": [[] for _ in ids],
            "brand": [None for _ in ids],
            "year": [None for _ in ids],
            "text": [texts[i] for i in ids],
        },
        schema=ITEMS_SCHEMA,
    )


def _rationale(user_id: int, text, prefix_len: int, key: str, error=None) -> dict:
    return dict(rationale_key=key, user_id=user_id, role="teacher", model="m", prompt_version="v1",
                prefix_len=prefix_len, prompt="p", text=text, step1=None, step2=None, step3=None,
                n_prompt_tokens=1, n_output_tokens=1, error=error)


@pytest.fixture()
def run_cfg(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "encode.batch_size=2", "encode.rows_per_file=3",
                             "encode.num_actors=2", "encode.forward_passes_per_batch=1"])
    lay = cfg.layout
    os.makedirs(lay.items)
    pq.write_table(_items_table(ITEM_TEXTS), os.path.join(lay.items, "part-0.parquet"))
    os.makedirs(lay.rationales("teacher"))
    rows = [
        _rationale(1, "Step 1: likes space opera. Step 2: Sci-Fi. Step 3: Alien.", 5, "a"),
        _rationale(1, "Step 1: short prefix rationale.", 3, "b"),  # shorter prefix: not chosen
        _rationale(2, "Step 1: family animation fan.", 4, "c"),
        _rationale(3, None, 4, "d", error="timeout"),  # failed generation: skipped
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=RATIONALES_SCHEMA),
                   os.path.join(lay.rationales("teacher"), "part-0.parquet"))
    return cfg


def test_encode_texts_plain_function_without_ray():
    texts = list(ITEM_TEXTS.values())
    v = encode_texts(texts, "all-minilm-l6-v2", batch_size=2, dtype="float32")
    assert v.shape == (5, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)  # normalised: dot = cosine
    sims = v @ v.T
    # Star Wars is closer to Alien (both sci-fi) than to Sleepless in Seattle (romance).
    assert sims[0, 3] > sims[0, 2] + 0.05
    vb = encode_texts(texts, "all-minilm-l6-v2", batch_size=5, dtype="bfloat16")
    assert vb.dtype == np.float32
    assert (np.sum(v * vb, axis=1) > 0.99).all()  # bf16 weights: same direction
    assert encode_texts([], "all-minilm-l6-v2").shape == (0, 384)
    with pytest.raises(TypeError, match="text #1"):
        encode_texts(["ok", None])


def test_run_encode_contract_resume_and_dedup(ray_session, run_cfg):
    from slim_ray.encode.stage import run_encode
    from slim_ray.stages import run_stage

    lay = run_cfg.layout
    res = run_stage("encode", run_cfg)["summary"]
    assert res["outputs"]["items"]["encoded"] == 5 and res["outputs"]["items"]["reused"] == 0
    assert res["outputs"]["teacher"]["encoded"] == 2  # users 1 and 2; user 3's rationale failed
    assert any("student" in n and "skipped" in n for n in res["notes"])
    assert not os.path.exists(lay.user_embeddings("student"))
    assert res["encoder"] == "sentence-transformers/all-MiniLM-L6-v2" and res["dtype"] == "bfloat16"
    assert res["job"]["rows"] == 7 and res["job"]["dim"] == 384  # items + rationales: one actor pool
    # blocks of one actor batch (2 rows), dispatched once both actors are loaded: both do work
    per_actor = res["job"]["rows_per_actor"]
    assert len(per_actor) == 2 and min(per_actor.values()) >= 1 and sum(per_actor.values()) == 7, per_actor
    import ray

    assert res["node_ids"] == [ray.get_runtime_context().get_node_id()]  # one local node did the work
    # rows_per_file=3: 5 items -> parts of 3 + 2 rows at most (Ray Data may cut smaller batches)
    assert res["outputs"]["items"]["parts_written"] >= 2

    # Contract: types, dims, kinds, one row per id, parts streamed (rows_per_file=3 -> >1 part).
    items = read_table(lay.item_embeddings)
    check_columns(items, embeddings_schema(384), lay.item_embeddings)
    assert sorted(items.column("id").to_pylist()) == [1, 2, 3, 4, 5]
    assert set(items.column("kind").to_pylist()) == {"item"}
    assert len(store.part_files(lay.item_embeddings)) >= 2
    ids, vecs = store.load_embeddings(lay.item_embeddings)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    ref = encode_texts([ITEM_TEXTS[i] for i in ids], dtype="bfloat16")
    assert (np.sum(ref * vecs, axis=1) > 0.999).all()  # the Ray path = the plain function

    uids, uvecs = store.load_embeddings(lay.user_embeddings("teacher"), kind="user")
    assert uids.tolist() == [1, 2]
    chosen = encode_texts(["Step 1: likes space opera. Step 2: Sci-Fi. Step 3: Alien."], dtype="bfloat16")
    assert float(chosen[0] @ uvecs[0]) > 0.999  # the longest-prefix rationale was embedded

    # Rerun: nothing re-encoded, nothing rewritten.
    before = store.part_files(lay.item_embeddings)
    res = run_encode(run_cfg)
    assert [res["outputs"][k]["encoded"] for k in ("items", "teacher")] == [0, 0] and res["job"] is None
    assert res["outputs"]["items"]["reused"] == 5
    assert store.part_files(lay.item_embeddings) == before

    # Two new items and one changed text: exactly those 3 are encoded; stale row replaced.
    texts = dict(ITEM_TEXTS)
    texts[5] = "Fargo (1996). Genres: Crime, Drama, Thriller. Directed by the Coen brothers."
    texts[6] = "Heat (1995). Genres: Action, Crime, Thriller."
    texts[7] = "Babe (1995). Genres: Children's, Comedy, Drama."
    os.remove(os.path.join(lay.items, "part-0.parquet"))
    pq.write_table(_items_table(texts), os.path.join(lay.items, "part-1.parquet"))
    # A duplicated part (as left by a crash during compaction) is deduplicated, not re-encoded;
    # a truncated part (a killed local writer) is deleted and its rows encoded again.
    parts = store.part_files(lay.item_embeddings)
    n_in_first = pq.ParquetFile(parts[0]).metadata.num_rows
    shutil.copy(parts[0], parts[0].replace(".parquet", "-copy.parquet"))
    with open(parts[-1], "rb") as f:
        head = f.read(100)
    lost = set(pq.read_table(parts[-1]).column("id").to_pylist()) - {5}  # id 5's text changed anyway
    with open(parts[-1], "wb") as f:
        f.write(head)
    res = run_encode(run_cfg)
    out = res["outputs"]["items"]
    assert out["unreadable_parts"] == [parts[-1]]
    assert out["encoded"] == 3 + len(lost) and out["reused"] == 4 - len(lost)
    assert out["dropped_rows"] >= n_in_first  # the copy's rows (and the stale row of id 5)
    ids, vecs = store.load_embeddings(lay.item_embeddings)  # raises on duplicate ids
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    new5 = encode_texts([texts[5]], dtype="bfloat16")[0]
    assert float(new5 @ vecs[4]) > 0.999


def test_encoder_change_reencodes_and_missing_inputs(ray_session, tmp_path, run_cfg):
    from slim_ray.encode.stage import EncodeInputError, item_inputs, rationale_inputs, run_encode

    # Missing items: a clear error naming the path. Missing rationales: None (skipped by the stage).
    with pytest.raises(FileNotFoundError, match="items not found"):
        item_inputs(str(tmp_path / "nope" / "items"))
    assert rationale_inputs(str(tmp_path / "nope")) is None

    # An item without text is named (one line, raised out of the Ray Data job).
    bad = _items_table(ITEM_TEXTS).to_pylist()
    bad[2]["text"] = "  "
    lay = run_cfg.layout
    os.remove(os.path.join(lay.items, "part-0.parquet"))
    pq.write_table(pa.Table.from_pylist(bad, schema=ITEMS_SCHEMA), os.path.join(lay.items, "x.parquet"))
    with pytest.raises(EncodeInputError, match=r"items: column 'text' is empty for item_id \[3\]") as e:
        run_encode(run_cfg)
    assert "item_id [3]" in str(e.value) and "\n" not in str(e.value)

    # Resume keys depend on the encoder settings: a dtype change asks for new keys for every row.
    from slim_ray.encode.encoder import EncoderSpec

    a = EncoderSpec.from_config(run_cfg.encode)
    b = EncoderSpec.from_config(run_cfg.encode.model_copy(update={"dtype": "float32"}))
    assert a.key("x") == a.key("x") and a.key("x") != b.key("x") and a.key("x") != a.key("y")


def test_step_parts_embed_one_step_of_the_chosen_rationale(ray_session, tmp_path):
    """encode.rationale_parts=[text, step3] (the per-step ablation) writes embeddings/<role>-step3
    with the Step 3 text of the row the whole-answer vector comes from; a user whose chosen answer
    has no Step 3 gets no vector, even when a shorter-prefix answer of theirs has one."""
    from slim_ray.encode.stage import run_encode

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "encode.batch_size=2", "encode.roles=[teacher]",
                             "encode.rationale_parts=[text,step3]"])
    lay = cfg.layout
    os.makedirs(lay.items)
    pq.write_table(_items_table(ITEM_TEXTS), os.path.join(lay.items, "part-0.parquet"))
    os.makedirs(lay.rationales("teacher"))
    rows = [_rationale(1, "Step 1: space opera. Step 3: Alien.", 5, "a"),
            _rationale(1, "Step 1: short. Step 3: Toy Story.", 3, "b"),
            _rationale(2, "Step 1: family animation fan.", 4, "c"),
            _rationale(3, "Step 1: crime. Step 3: Heat.", 4, "d")]
    for r, s3 in zip(rows, ["Alien.", "Toy Story.", None, "Heat."]):
        r["step3"] = s3
    pq.write_table(pa.Table.from_pylist(rows, schema=RATIONALES_SCHEMA),
                   os.path.join(lay.rationales("teacher"), "part-0.parquet"))
    res = run_encode(cfg)
    assert res["outputs"]["teacher"]["encoded"] == 3 and res["outputs"]["teacher-step3"]["encoded"] == 2
    ids, vecs = store.load_embeddings(lay.user_embeddings("teacher-step3"), kind="user")
    assert ids.tolist() == [1, 3]
    want = encode_texts(["Alien.", "Heat."], dtype="bfloat16")
    assert (np.sum(want * vecs, axis=1) > 0.999).all()
    whole = store.load_embeddings(lay.user_embeddings("teacher"), kind="user")[1]
    assert float(whole[0] @ vecs[0]) < 0.99  # the step alone, not the whole answer
