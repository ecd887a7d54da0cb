"""Readers: RecBole atomic, Amazon JSON lines (plain/.gz/2014 literals), Parquet/CSV, bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slim_ray.data.config import PrepareConfig
from slim_ray.data.readers import BadInputError, build_specs, expand_paths, read_local

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


def write(path, text):
    path.write_text(text)
    return str(path)


def specs(**kw):
    cfg = PrepareConfig(**kw)
    inter = expand_paths(cfg.interactions, "interaction")
    items = expand_paths(cfg.items, "item metadata") if cfg.items else []
    return build_specs(cfg, inter, items)


def atomic_pair(tmp_path, rows=None):
    rows = rows or ["1\t10\t4\t100", "1\t11\t3\t100", "2\t10\t5\t90", "1\t12\t2\t50"]
    inter = write(tmp_path / "x.inter", INTER_HEADER + "\n".join(rows) + "\n")
    item = write(tmp_path / "x.item", ITEM_HEADER + "10\tToy Story\t1995\tAnimation Comedy\n"
                 "11\tHeat (1995)\t\tAction\n12\tNo Year\t\t\n")
    return inter, item


def test_atomic_reader_types_and_file_order(tmp_path):
    inter, item = atomic_pair(tmp_path)
    si, sm = specs(source="atomic", interactions=inter, items=item)
    t, skipped, _ = read_local(si)
    assert skipped == 0
    assert t.column("user_key").to_pylist() == ["1", "1", "2", "1"]
    assert t.column("item_key").to_pylist() == ["10", "11", "10", "12"]
    assert t.schema.field("timestamp").type == pa.int64()
    assert t.column("timestamp").to_pylist() == [100, 100, 90, 50]
    assert t.column("rating").to_pylist() == [4.0, 3.0, 5.0, 2.0]
    ords = t.column("ord").to_numpy()
    assert (np.diff(ords) > 0).all()  # ord follows the file rows: the tie-break
    m, _, _ = read_local(sm)
    rows = {r["item_key"]: r for r in m.to_pylist()}
    assert rows["10"]["title"] == "Toy Story" and rows["10"]["year"] == 1995
    assert rows["10"]["categories"] == ["Animation", "Comedy"]
    assert rows["11"]["year"] is None and rows["12"]["categories"] == []


def test_byte_range_pieces_give_the_same_rows(tmp_path):
    rows = [f"{u}\t{i}\t1\t{1000 + (u * 7 + i) % 13}" for u in range(1, 30) for i in range(1, 8)]
    inter, _ = atomic_pair(tmp_path, rows)
    whole, _ = specs(source="atomic", interactions=inter)
    small, _ = specs(source="atomic", interactions=inter)
    small.chunk_bytes = 37  # many pieces, boundaries inside lines
    a, _, _ = read_local(whole)
    b, _, _ = read_local(small)
    assert b.num_rows == len(rows)
    assert b.drop_columns(["ord"]).equals(a.drop_columns(["ord"]))
    assert (np.diff(b.column("ord").to_numpy()) > 0).all()


def amazon_files(tmp_path, gz=False, reviews=None):
    reviews = reviews or [
        {"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1300000000, "reviewText": "x"},
        {"reviewerID": "U2", "asin": "B2", "overall": 4.0, "unixReviewTime": 1300000100, "style": {"a": 1}},
        {"reviewerID": "U1", "asin": "B2", "overall": 3.0, "unixReviewTime": 1300000000},
    ]
    meta = [
        json.dumps({"asin": "B1", "title": "Zelda &amp; Link", "brand": "Nintendo",
                    "category": ["Video Games", "Action"], "description": ["Great", "game"]}),
        "{'asin': 'B2', 'title': 'Old Format', 'categories': [['Video Games', 'PC']], 'brand': 'Sega'}",
    ]
    body = "".join(json.dumps(r) + "\n" for r in reviews)
    mbody = "\n".join(meta) + "\n"
    if gz:
        r, m = tmp_path / "reviews.json.gz", tmp_path / "meta.json.gz"
        with gzip.open(r, "wt") as f:
            f.write(body)
        with gzip.open(m, "wt") as f:
            f.write(mbody)
        return str(r), str(m)
    return write(tmp_path / "reviews.json", body), write(tmp_path / "meta.json", mbody)


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_reader_plain_and_gz(tmp_path, gz):
    r, m = amazon_files(tmp_path, gz)
    si, sm = specs(source="amazon", interactions=r, items=m)
    t, _, _ = read_local(si)
    assert t.column("user_key").to_pylist() == ["U1", "U2", "U1"]
    assert t.column("timestamp").to_pylist() == [1300000000, 1300000100, 1300000000]
    assert t.column("rating").to_pylist() == [5.0, 4.0, 3.0]
    meta, _, _ = read_local(sm)
    rows = {x["item_key"]: x for x in meta.to_pylist()}
    assert rows["B1"]["categories"] == ["Video Games", "Action"]
    assert rows["B1"]["description"] == "Great game"
    assert rows["B2"]["categories"] == ["Video Games", "PC"]  # 2014 list-of-lists, Python literal
    assert rows["B2"]["brand"] == "Sega"


def test_tabular_parquet_and_csv_with_mapping(tmp_path):
    t = pa.table({"uid": [1, 2, 1], "iid": ["a", "b", "c"], "ts": [5, 6, 7]})
    pq.write_table(t, tmp_path / "log.parquet", row_group_size=2)
    si, _ = specs(source="tabular", interactions=str(tmp_path / "log.parquet"),
                  columns={"user": "uid", "item": "iid", "timestamp": "ts"})
    out, _, _ = read_local(si)
    assert out.column("user_key").to_pylist() == ["1", "2", "1"]
    assert out.column("timestamp").to_pylist() == [5, 6, 7]
    assert (np.diff(out.column("ord").to_numpy()) > 0).all()  # across row groups too
    csv_path = write(tmp_path / "log.csv", "uid,iid,ts,extra\n1,a,5,\"q,x\"\n2,b,6,y\n")
    si, _ = specs(source="tabular", interactions=csv_path, columns={"user": "uid", "item": "iid", "timestamp": "ts"})
    out, _, _ = read_local(si)
    assert out.column("item_key").to_pylist() == ["a", "b"]


# --------------------------------------------------------------------------- bad input


def test_missing_column_names_file_and_column(tmp_path):
    path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    with pytest.raises(BadInputError, match=r"x\.inter: missing column 'timestamp'"):
        specs(source="atomic", interactions=path)
    path = write(tmp_path / "y.csv", "u,i,t\n1,2,3\n")
    with pytest.raises(BadInputError, match=r"y\.csv: missing column 'when' \(mapped from 'timestamp'\)"):
        specs(source="tabular", interactions=path, columns={"user": "u", "item": "i", "timestamp": "when"})


def test_malformed_line_names_file_and_line(tmp_path):
    inter, _ = atomic_pair(tmp_path, ["1\t10\t4\t100", "1\t11\t3\t100", "2\t10\t5", "1\t12\t2\t50"])
    si, _ = specs(source="atomic", interactions=inter)
    with pytest.raises(BadInputError, match=r"x\.inter: line 4: malformed line: expected 4 fields, got 3"):
        read_local(si)


def test_non_numeric_timestamp_names_field(tmp_path):
    r, _ = amazon_files(tmp_path, reviews=[
        {"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1},
        {"reviewerID": "U1", "asin": "B2", "overall": 5.0, "unixReviewTime": "soon"},
    ])
    si, _ = specs(source="amazon", interactions=r)
    with pytest.raises(BadInputError, match=r"reviews\.json: line 2: field 'unixReviewTime': 'soon' is not a number"):
        read_local(si)


def test_malformed_json_and_missing_field(tmp_path):
    path = write(tmp_path / "r.json", '{"reviewerID": "U1", "asin": "B1", "unixReviewTime": 1}\n{"reviewerID": "U1", "asin"\n')
    si, _ = specs(source="amazon", interactions=path)
    with pytest.raises(BadInputError, match=r"r\.json: line 2: malformed JSON"):
        read_local(si)
    path = write(tmp_path / "s.json", '{"reviewerID": "U1", "unixReviewTime": 1}\n')
    si, _ = specs(source="amazon", interactions=path)
    with pytest.raises(BadInputError, match=r"s\.json: line 1: missing field 'asin'"):
        read_local(si)


def test_bad_line_in_a_later_piece_reports_the_true_line(tmp_path):
    rows = [f"{u}\t{u % 5}\t1\t{u}" for u in range(1, 200)]
    rows[150] = f"151\t1\t1\tnot-a-time"
    inter, _ = atomic_pair(tmp_path, rows)
    si, _ = specs(source="atomic", interactions=inter)
    si.chunk_bytes = 64
    with pytest.raises(BadInputError, match=r"x\.inter: line 152: field 'timestamp': 'not-a-time' is not a number"):
        read_local(si)


def test_unreadable_files(tmp_path):
    with pytest.raises(BadInputError, match=r"nope\.inter: interaction file does not exist"):
        specs(source="atomic", interactions=str(tmp_path / "nope.inter"))
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    si, _ = specs(source="amazon", interactions=str(broken))
    with pytest.raises(BadInputError, match=r"broken\.json\.gz: cannot read file"):
        read_local(si)


def test_skip_mode_counts_and_reports_examples(tmp_path):
    rows = [f"{u}\t{u % 5}\t1\t{u}" for u in range(1, 50)]
    rows[9] = "10\t1\t1\tbad"
    rows[19] = "20\t1"
    inter, _ = atomic_pair(tmp_path, rows)
    si, _ = specs(source="atomic", interactions=inter, on_bad_lines="skip")
    si.chunk_bytes = 100
    t, skipped, examples = read_local(si)
    assert skipped == 2 and t.num_rows == 47
    assert any("line 11: field 'timestamp'" in e for e in examples)
    assert any("line 21: malformed line" in e for e in examples)
    assert all("x.inter" in e for e in examples)
