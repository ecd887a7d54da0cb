"""The output folder: atomic parts named by content, the done set, compaction. No Ray, no model."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from slim_ray.data.io import read_rationales
from slim_ray.generate.store import OUTPUT_SCHEMA, compact, done_pairs, pair_hash, part_files, remove_temp_files, write_part


def _rows(pairs, error=None) -> pa.Table:
    rows = [{f.name: None for f in OUTPUT_SCHEMA} | {"user_id": u, "rationale_key": k, "error": error,
                                                     "text": f"t{u}{k}", "seen_items": []} for u, k in pairs]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def test_parts_are_idempotent_and_atomic(tmp_path):
    out = str(tmp_path)
    p1 = write_part(_rows([(1, "a"), (2, "b")]), out)
    p2 = write_part(_rows([(1, "a"), (2, "b")]), out)  # a retried task: same name, no copy
    assert p1 == p2 and part_files(out) == [p1]
    open(os.path.join(out, ".part-x.parquet.123.tmp"), "w").write("half")  # left by a killed writer
    assert remove_temp_files(out) == 1 and read_rationales(out).num_rows == 2


def test_done_set_and_compaction(tmp_path):
    out = str(tmp_path)
    write_part(_rows([(1, "a"), (2, "b")]), out)
    write_part(_rows([(3, "c")], error="RuntimeError: boom"), out)  # failed: not done
    write_part(_rows([(4, "old")]), out)  # another config's row for user 4
    assert set(done_pairs(out)) == set(pair_hash([1, 2, 4], ["a", "b", "old"]))
    write_part(_rows([(3, "c"), (6, "f")]), out)  # the retry succeeded (in another batch)
    write_part(_rows([(2, "b"), (5, "e")]), out)  # a duplicate of user 2 (e.g. two concurrent runs)
    wanted = pair_hash([1, 2, 3, 4, 5, 6], ["a", "b", "c", "new", "e", "f"])
    stats = compact(out, wanted)
    assert stats == {"rows": 5, "dropped_stale": 1, "dropped_duplicate": 1, "dropped_superseded_error": 1, "errors": 0}
    t = read_rationales(out)
    assert sorted(zip(t["user_id"].to_pylist(), t["rationale_key"].to_pylist())) == [(1, "a"), (2, "b"), (3, "c"), (5, "e"), (6, "f")]
    assert t.filter(t["error"].is_valid()).num_rows == 0
    assert compact(out, wanted)["rows"] == 5  # idempotent
    # the same batch retried: same part name, the success replaces the failure in place
    write_part(_rows([(7, "g")], error="boom"), out)
    write_part(_rows([(7, "g")]), out)
    assert read_rationales(out).filter(pa.compute.equal(read_rationales(out)["user_id"], 7))["error"].null_count == 1
