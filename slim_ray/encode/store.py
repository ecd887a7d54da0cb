"""An embeddings folder on disk, and what is left to encode in it.

A folder (e.g. ``<run>/embeddings/items/``) holds Parquet parts ``part-*.parquet`` with the
embeddings contract (``id, kind, encoder, vector``) plus one extra column, ``encode_key`` =
sha256(encoder weights + dtype + normalize + max_seq_length, text). A row is reused on the next
run only when its id asks for the very same key, so changing an item's text or the encoder
re-encodes exactly the rows affected and nothing else. Parts are written atomically (temp file +
rename) as results stream in: an interrupted run leaves only whole parts, and the next run
resumes from them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from slim_ray.data.io import write_table
from slim_ray.data.schemas import embeddings_schema

logger = logging.getLogger(__name__)

ENCODE_KEY = "encode_key"


def output_schema(dim: int) -> pa.Schema:
    return embeddings_schema(dim).append(pa.field(ENCODE_KEY, pa.string()))


def part_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.endswith(".parquet") and not f.startswith((".", "_"))
    )


def read_parts(folder: str) -> tuple[Optional[pa.Table], list[str]]:
    """All parts of ``folder`` as one table (None when there are none) and the files read."""
    files = part_files(folder)
    if not files:
        return None, []
    tables = []
    for f in files:
        t = pq.read_table(f)
        for col in ("id", "vector", ENCODE_KEY):
            if col not in t.column_names:
                raise ValueError(f"{f}: missing column '{col}' (not an embeddings part written by the encode stage)")
        tables.append(t)
    dims = {t.schema.field("vector").type.list_size for t in tables}
    if len(dims) > 1:  # an encoder change left parts of another width: keep none of the odd ones
        keep = max(dims, key=lambda d: sum(t.num_rows for t in tables if t.schema.field("vector").type.list_size == d))
        tables = [t for t in tables if t.schema.field("vector").type.list_size == keep]
    return pa.concat_tables(tables), files


@dataclass
class Plan:
    keep: Optional[pa.Table]  # existing rows that stay (one per id, key matches)
    todo: pa.Table  # id, text, encode_key: rows to encode
    compact: bool  # existing parts hold stale or duplicate rows: rewrite ``keep`` and drop them
    files: list[str]

    @property
    def reused(self) -> int:
        return 0 if self.keep is None else self.keep.num_rows


def plan(folder: str, inputs: pa.Table) -> Plan:
    """Split ``inputs`` (id, text, encode_key) into rows already in ``folder`` and rows to encode."""
    existing, files = read_parts(folder)
    want = dict(zip(inputs.column("id").to_pylist(), inputs.column(ENCODE_KEY).to_pylist()))
    if existing is None:
        return Plan(None, inputs, False, [])
    seen: set[int] = set()
    mask = []
    for i, k in zip(existing.column("id").to_pylist(), existing.column(ENCODE_KEY).to_pylist()):
        ok = i not in seen and want.get(i) == k
        if ok:
            seen.add(i)
        mask.append(ok)
    keep = existing.filter(pa.array(mask, pa.bool_()))
    todo = inputs.filter(pa.array([i not in seen for i in inputs.column("id").to_pylist()], pa.bool_()))
    compact = keep.num_rows != sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return Plan(keep, todo, compact, files)


def new_part_path(folder: str) -> str:
    return os.path.join(folder, f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")


def write_part(table: pa.Table, folder: str) -> str:
    path = new_part_path(folder)
    write_table(table, path)
    return path


def compact(folder: str, keep: Optional[pa.Table], old_files: list[str]) -> None:
    """Replace ``old_files`` by one part holding ``keep``. The new part is written before the old
    ones go, so a crash in between only leaves duplicates, which the next ``plan`` drops."""
    if keep is not None and keep.num_rows:
        write_part(keep, folder)
    for f in old_files:
        os.remove(f)


def clean_temp_files(folder: str) -> None:
    """Remove ``*.tmp`` leftovers of an interrupted write (never complete parts)."""
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.endswith(".parquet.tmp"):
                os.remove(os.path.join(folder, f))


def load_embeddings(folder: str, kind: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, dim]) of an embeddings folder, sorted by id.

    This is what the recommender and the serving graph read. ``kind`` filters item/user rows.
    """
    table, _ = read_parts(folder)
    if table is None:
        raise FileNotFoundError(f"{folder}: no embeddings parts (run `slim-ray encode` first)")
    if kind is not None:
        table = table.filter(pc.equal(table.column("kind"), kind))
    dim = table.schema.field("vector").type.list_size
    ids = table.column("id").to_numpy()
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vecs = np.asarray(flat, dtype=np.float32).reshape(-1, dim)
    order = np.argsort(ids, kind="stable")
    ids, vecs = ids[order], vecs[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        raise ValueError(f"{folder}: duplicate ids {ids[1:][np.diff(ids) == 0][:5].tolist()}")
    return ids, vecs
