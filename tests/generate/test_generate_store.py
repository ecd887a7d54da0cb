"""The output folder: parts named by content, the done set, compaction, folder totals -- on a local
folder and on a real S3-protocol server (moto on loopback). No Ray, no model."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import make_bucket
from gen_data import items_table, sequences_table
from slim_ray import storage
from slim_ray.generate.models import read_items
from slim_ray.generate.stage import _sequence_files, select_users
from slim_ray.generate.store import (
    OUTPUT_SCHEMA, compact, done_pairs, folder_totals, pair_hash, part_files, remove_temp_files, write_part,
)


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "rationales" / "teacher")
    request.getfixturevalue("s3_server")
    return make_bucket(f"gen-{uuid.uuid4().hex[:8]}") + "/run/rationales/teacher"


def _rows(pairs, error=None, tokens=(10, 3)) -> pa.Table:
    rows = [{f.name: None for f in OUTPUT_SCHEMA} | {
        "user_id": u, "rationale_key": k, "error": error, "text": f"t{u}{k}", "seen_items": [],
        "steps_found": 3, "n_prompt_tokens": 0 if error else tokens[0], "n_output_tokens": 0 if error else tokens[1],
    } for u, k in pairs]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _read(out: str) -> pa.Table:
    return storage.read_table(out)


def test_parts_are_idempotent_and_atomic(out):
    p1 = write_part(_rows([(1, "a"), (2, "b")]), out)
    p2 = write_part(_rows([(1, "a"), (2, "b")]), out)  # a retried task: same name, no copy
    assert p1 == p2 and part_files(out) == [p1]
    storage.write_bytes(storage.join(out, ".part-x.parquet.123.tmp"), b"half")  # left by a killed writer
    assert part_files(out) == [p1]  # never listed as a part
    assert remove_temp_files(out) == 1 and _read(out).num_rows == 2
    assert storage.list_files(out, include_hidden=True) == [p1]


def test_done_set_compaction_and_totals(out):
    write_part(_rows([(1, "a"), (2, "b")]), out)
    write_part(_rows([(3, "c")], error="RuntimeError: boom"), out)  # failed: not done
    write_part(_rows([(4, "old")]), out)  # another config's row for user 4
    assert set(done_pairs(out)) == set(pair_hash([1, 2, 4], ["a", "b", "old"]))
    write_part(_rows([(3, "c"), (6, "f")]), out)  # the retry succeeded (in another batch)
    write_part(_rows([(2, "b"), (5, "e")]), out)  # a duplicate of user 2 (e.g. two concurrent runs)
    write_part(_rows([(7, "g")], error="boom"), out)  # still failing
    write_part(_rows([(7, "g"), (8, "h")], error="boom again"), out)  # a second failed attempt of 7
    wanted = pair_hash([1, 2, 3, 4, 5, 6, 7, 8, 9], ["a", "b", "c", "new", "e", "f", "g", "h", "i"])
    stats = compact(out, wanted)
    assert stats == {"rows": 7, "dropped_stale": 1, "dropped_duplicate": 2, "dropped_superseded_error": 1,
                     "errors": 2}
    t = _read(out)
    got = sorted(zip(t["user_id"].to_pylist(), t["rationale_key"].to_pylist()))
    assert got == [(1, "a"), (2, "b"), (3, "c"), (5, "e"), (6, "f"), (7, "g"), (8, "h")]
    assert sorted(t.filter(pc.is_valid(t["error"]))["user_id"].to_pylist()) == [7, 8]
    assert compact(out, wanted)["rows"] == 7  # idempotent
    # the totals: 5 done, 2 failed, users 4 (new key) and 9 never written; tokens of successful rows only
    tot = folder_totals(out, wanted)
    assert (tot["done_rows"], tot["failed_rows"], tot["missing_rows"], tot["rows"]) == (5, 2, 2, 7)
    assert (tot["prompt_tokens"], tot["output_tokens"], tot["all_three_steps"]) == (50, 15, 5)
    # the same batch retried: same part name, the success replaces the failure in place
    write_part(_rows([(9, "i")], error="boom"), out)
    write_part(_rows([(9, "i")]), out)
    assert _read(out).filter(pc.equal(_read(out)["user_id"], 9))["error"].null_count == 1


def test_compaction_without_a_wanted_set_keeps_first_rows(out):
    # the prompt stage saw an incomplete picture: nothing is stale, duplicates still go
    write_part(_rows([(1, "a"), (1, "a"), (2, "b")]), out)
    write_part(_rows([(2, "b"), (3, "c")]), out)
    assert compact(out, None) == {"rows": 3, "dropped_stale": 0, "dropped_duplicate": 2,
                                  "dropped_superseded_error": 0, "errors": 0}
    assert sorted(_read(out)["user_id"].to_pylist()) == [1, 2, 3]
    assert "missing_rows" not in folder_totals(out)


def test_inputs_read_through_storage(out):
    run = out.rsplit("/rationales/", 1)[0]
    storage.write_table(items_table(), storage.join(run, "prepared", "items", "part-0.parquet"))
    seq = storage.join(run, "prepared", "sequences")
    storage.write_table(sequences_table(30), storage.join(seq, "part-0.parquet"))
    files = _sequence_files(seq)
    assert files == [storage.join(seq, "part-0.parquet")]
    assert read_items(storage.join(run, "prepared", "items")).num_rows == 12
    sample, n = select_users(files, 10, seed=0)
    assert n == 10 and len(sample) == 10 and np.all(np.isin(sample, np.arange(1, 31)))
