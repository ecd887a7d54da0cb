"""The transformation: k-core fixpoint, dense ids, tie-break, leave-one-out, max_seq_len, text."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from slim_ray.data.prepare import leave_one_out, ordered_vocab, prepare_tables
from slim_ray.data.readers import INTERACTIONS_SCHEMA, ITEM_META_SCHEMA, BadInputError
from slim_ray.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from slim_ray.data.text import clean_text, render_text, split_title_year


def log(rows):
    """rows: (user, item, timestamp[, rating]) in file order."""
    return pa.table(
        {
            "user_key": [str(r[0]) for r in rows],
            "item_key": [str(r[1]) for r in rows],
            "timestamp": [r[2] for r in rows],
            "ord": list(range(len(rows))),
            "rating": [float(r[3]) if len(r) > 3 else None for r in rows],
        },
        schema=INTERACTIONS_SCHEMA,
    )


def seqs_by_key(seqs):
    return {r["user_key"]: r for r in seqs.to_pylist()}


def test_kcore_cascades_to_the_hand_checked_fixpoint():
    # min_user=3, min_item=2. e, f are rare -> u4 loses them (1 left) -> d drops to 1 -> u3 drops
    # to 2 (a, b) -> fixpoint: u1, u2 with a, b, c.
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3),
            ("u2", "a", 1), ("u2", "b", 2), ("u2", "c", 3),
            ("u3", "a", 1), ("u3", "b", 2), ("u3", "d", 3),
            ("u4", "d", 1), ("u4", "e", 2), ("u4", "f", 3)]
    items, seqs, summary = prepare_tables(log(rows), None, min_user_count=3, min_item_count=2)
    assert sorted(seqs.column("user_key").to_pylist()) == ["u1", "u2"]
    assert items.column("item_key").to_pylist() == ["a", "b", "c"]
    assert items.column("item_id").to_pylist() == [1, 2, 3]
    assert summary["interactions"] == 6 and summary["kcore_passes"] >= 3
    assert seqs_by_key(seqs)["u1"]["item_ids"] == [1, 2, 3]


def _naive_kcore(rows, ku, ki):
    rows = list(rows)
    while True:
        uc, ic = {}, {}
        for u, i, _ in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [r for r in rows if uc[r[0]] >= ku and ic[r[1]] >= ki]
        if len(kept) == len(rows):
            return kept
        rows = kept


def test_kcore_matches_a_naive_loop_on_random_logs():
    rng = np.random.default_rng(3)
    for trial in range(5):
        n = 600
        users = rng.integers(0, 80, n)
        items = (rng.zipf(1.4, n) - 1) % 120
        rows = list({(f"u{u}", f"i{i}"): (f"u{u}", f"i{i}", int(t)) for u, i, t in
                     zip(users, items, rng.integers(0, 50, n))}.values())
        expected = _naive_kcore(rows, 4, 3)
        _, seqs, summary = prepare_tables(log(rows), None, min_user_count=4, min_item_count=3, max_seq_len=None)
        assert summary["interactions"] == len(expected)
        assert sorted(seqs.column("user_key").to_pylist()) == sorted({r[0] for r in expected})


def test_time_order_with_stable_file_order_tie_break_and_dense_ids():
    rows = [("7", "x", 50), ("7", "z", 10), ("7", "y", 10), ("7", "w", 10), ("7", "v", 5),
            ("10", "x", 1), ("10", "y", 2), ("10", "z", 3), ("9", "v", 1), ("9", "w", 1), ("9", "x", 1)]
    items, seqs, _ = prepare_tables(log(rows), None, min_user_count=3, min_item_count=1)
    ids = dict(zip(items.column("item_key").to_pylist(), items.column("item_id").to_pylist()))
    assert ids == {"v": 1, "w": 2, "x": 3, "y": 4, "z": 5}
    s = seqs_by_key(seqs)
    # numeric keys are ordered numerically: 7 < 9 < 10
    assert (s["7"]["user_id"], s["9"]["user_id"], s["10"]["user_id"]) == (1, 2, 3)
    # ties at t=10 keep the file order z, y, w
    assert s["7"]["item_ids"] == [ids["v"], ids["z"], ids["y"], ids["w"], ids["x"]]
    assert s["7"]["timestamps"] == [5, 10, 10, 10, 50]
    assert s["9"]["item_ids"] == [ids["v"], ids["w"], ids["x"]]
    assert seqs.schema.equals(SEQUENCES_SCHEMA) and items.schema.equals(ITEMS_SCHEMA)


def test_vocab_order_numeric_or_lexicographic():
    assert ordered_vocab(pa.array(["10", "9", "1", "9"])).to_pylist() == ["1", "9", "10"]
    assert ordered_vocab(pa.array(["b10", "b9", "a"])).to_pylist() == ["a", "b10", "b9"]


def test_leave_one_out_and_max_seq_len_keeps_the_most_recent():
    rows = [("u", f"i{k}", k) for k in range(10)] + [("v", f"i{k}", k) for k in range(10)]
    _, seqs, summary = prepare_tables(log(rows), None, min_user_count=1, min_item_count=1, max_seq_len=4)
    s = seqs_by_key(seqs)["u"]
    assert s["timestamps"] == [6, 7, 8, 9]
    train, valid, test = leave_one_out(s["item_ids"])
    assert train == s["item_ids"][:2] and valid == s["item_ids"][2] and test == s["item_ids"][3]
    assert summary["interactions"] == 20  # k-core counts the full history
    with pytest.raises(ValueError, match=">= 3"):
        leave_one_out([1, 2])


def test_min_user_count_below_three_still_leaves_one_out():
    rows = [("u", "a", 1), ("u", "b", 2), ("v", "a", 1), ("v", "b", 2), ("v", "c", 3)]
    _, seqs, _ = prepare_tables(log(rows), None, min_user_count=1, min_item_count=1)
    assert seqs.column("user_key").to_pylist() == ["v"]


def test_max_users_min_rating_and_dedup():
    rows = [("1", "a", 1, 5), ("1", "b", 2, 1), ("1", "c", 3, 5), ("1", "d", 4, 5),
            ("2", "a", 1, 5), ("2", "a", 1, 5), ("2", "b", 2, 5), ("2", "c", 3, 5),
            ("3", "a", 1, 5), ("3", "b", 2, 5), ("3", "c", 3, 5)]
    _, seqs, _ = prepare_tables(log(rows), None, min_user_count=3, min_item_count=1, max_users=2)
    assert seqs.column("user_key").to_pylist() == ["1", "2"]
    _, seqs, _ = prepare_tables(log(rows), None, min_user_count=3, min_item_count=1, min_rating=4)
    assert len(seqs_by_key(seqs)["1"]["item_ids"]) == 3  # the rating-1 row is gone
    _, seqs, s1 = prepare_tables(log(rows), None, min_user_count=3, min_item_count=1, dedup=True)
    assert len(seqs_by_key(seqs)["2"]["item_ids"]) == 3 and s1["interactions"] == 10


def test_empty_after_kcore_is_an_error_naming_the_input():
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3)]
    with pytest.raises(BadInputError, match=r"log\.json: no interactions left after k-core "
                       r"\(min_user_count=3, min_item_count=2, max_users=None\)"):
        prepare_tables(log(rows), None, min_user_count=3, min_item_count=2, where="log.json")


# --------------------------------------------------------------------------- item text


def test_title_year_parsing_and_rendering():
    assert split_title_year("Toy Story (1995)") == ("Toy Story", 1995)
    assert split_title_year("City of Lost Children, The (1995)") == ("City of Lost Children, The", 1995)
    assert split_title_year("Se7en") == ("Se7en", None)
    assert render_text("Toy Story", ["Animation", "Comedy"], None, 1995, category_label="Genres") == \
        "Toy Story (1995). Genres: Animation, Comedy."
    assert render_text("Zelda", ["Video Games"], "Nintendo") == "Zelda. Categories: Video Games. Brand: Nintendo."
    assert render_text(None, [], None, None, fallback="Item B1") == "Item B1."
    assert clean_text("A &amp; B <br/> C", 100) == "A & B C"
    assert clean_text("word " * 50, 20).endswith("...") and len(clean_text("word " * 50, 20)) <= 23


def test_items_table_from_metadata():
    rows = [("u", "m1", 1), ("u", "m2", 2), ("u", "m3", 3)]
    meta = pa.table(
        {
            "item_key": ["m1", "m2", "m1"],
            "title": ["Heat (1995)", "Brand &amp; Co", "duplicate, ignored"],
            "categories": [["Action", "Action", "Crime"], [], []],
            "brand": [None, "by  Acme", None],
            "year": [None, 2001, None],
            "description": [None, "d", None],
            "ord": [0, 1, 2],
        },
        schema=ITEM_META_SCHEMA,
    )
    items, _, summary = prepare_tables(log(rows), meta, min_user_count=3, min_item_count=1)
    r = {x["item_key"]: x for x in items.to_pylist()}
    assert r["m1"]["title"] == "Heat" and r["m1"]["year"] == 1995 and r["m1"]["categories"] == ["Action", "Crime"]
    assert r["m1"]["text"] == "Heat (1995). Categories: Action, Crime."
    assert r["m2"]["title"] == "Brand & Co" and r["m2"]["brand"] == "Acme" and r["m2"]["year"] == 2001
    assert r["m3"]["title"] is None and r["m3"]["text"] == "Item m3."
    assert summary["items_without_metadata"] == 1


def test_driver_key_set_merges_to_the_distinct_keys():
    from slim_ray.data.stage import _KeySet

    ks = _KeySet(slack=3)
    for chunk in (["b", "a", "b"], ["c", "a"], ["d", "b", "c", "e"], ["a"]):
        ks.add(pa.array(chunk))
    assert ks.size < 13  # merged on the way
    assert ordered_vocab(ks.keys()).to_pylist() == ["a", "b", "c", "d", "e"]
