"""An embeddings folder on storage, and what is left to encode in it.

A folder (e.g. ``<run>/embeddings/items/``, local or ``s3://...``) holds Parquet parts
``part-*.parquet`` with the embeddings contract (``id, kind, encoder, vector``) plus one extra
column, ``encode_key`` = sha256(encoder weights + dtype + normalize + max_seq_length, text). A row
is reused on the next run only when its id asks for the very same key, so changing an item's text
or the encoder re-encodes exactly the rows affected and nothing else.

Every part is published whole through ``slim_ray.storage`` (temp name + rename on a local disk, a
single PUT on an object store) and named by a hash of its rows, so a retried writer task
overwrites its own part instead of adding a copy. An interrupted run leaves only whole parts; the
next run reuses them.

``plan_folder`` is the resume step. It reads only the ``id`` and ``encode_key`` columns of the
existing parts and keeps, per id, the first row whose key is the one asked for; parts that hold
stale rows (old text, old encoder, ids no longer wanted), duplicates (a crash between writing a
compacted part and deleting the old ones, a retried task) or that cannot be read (a truncated
file) are rewritten with their kept rows only. It runs inside one Ray task per folder (see
``slim_ray.encode.stage``): its memory is the (id, key) pairs of one output, never the vectors of
more than one part.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray import storage
from slim_ray.data.schemas import embeddings_schema

logger = logging.getLogger(__name__)

ENCODE_KEY = "encode_key"
KEY_COLUMNS = ["id", ENCODE_KEY]


def output_schema(dim: int) -> pa.Schema:
    return embeddings_schema(dim).append(pa.field(ENCODE_KEY, pa.string()))


def part_files(folder: str) -> list[str]:
    """Sorted URIs of the visible parts of ``folder`` (empty when it does not exist)."""
    return storage.list_files(folder, suffix=".parquet")


def part_name(table: pa.Table) -> str:
    """A name that depends only on the rows: a retried write lands on the same part."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(table.column("id").to_numpy()).tobytes())
    for chunk in table.column(ENCODE_KEY).chunks:
        h.update("\n".join(chunk.to_pylist()).encode())
    return f"part-{h.hexdigest()[:24]}.parquet"


def write_part(table: pa.Table, folder: str) -> str:
    """Publish ``table`` as one whole part of ``folder``; returns its URI."""
    path = storage.join(folder, part_name(table))
    storage.write_table(table, path)
    return path


def _check_part(schema: pa.Schema, path: str) -> None:
    for col in ("id", "vector", ENCODE_KEY):
        if schema.get_field_index(col) < 0:
            raise ValueError(f"{path}: missing column '{col}' (not an embeddings part written by the encode stage)")


def _dim(schema: pa.Schema) -> int:
    return schema.field("vector").type.list_size


def read_parts(folder: str) -> Optional[pa.Table]:
    """All parts of ``folder`` as one table (None when there are none). Parts of a vector width
    other than the majority's (an encoder change) are left out."""
    tables = []
    for f in part_files(folder):
        t = storage.read_parquet_file(f)
        _check_part(t.schema, f)
        tables.append(t)
    if not tables:
        return None
    dims = {_dim(t.schema) for t in tables}
    if len(dims) > 1:
        keep = max(dims, key=lambda d: sum(t.num_rows for t in tables if _dim(t.schema) == d))
        tables = [t for t in tables if _dim(t.schema) == keep]
    return pa.concat_tables(tables)


@dataclass
class FolderPlan:
    """What ``plan_folder`` found and did in one output folder."""

    input_rows: int = 0
    reused: int = 0
    kept: Optional[pa.Table] = None  # (id, encode_key) of the reused rows
    rewritten_parts: int = 0  # parts that held stale or duplicate rows
    dropped_rows: int = 0  # stale or duplicate rows removed
    unreadable_parts: list[str] = field(default_factory=list)  # deleted; their rows are re-encoded

    @property
    def todo(self) -> int:
        return self.input_rows - self.reused

    def summary(self) -> dict:
        return {"input_rows": self.input_rows, "reused": self.reused, "rewritten_parts": self.rewritten_parts,
                "dropped_rows": self.dropped_rows, "unreadable_parts": list(self.unreadable_parts)}


def _existing_keys(files: list[str]) -> tuple[list[pa.Table], list[str]]:
    """(id, encode_key, file index) of every readable part, and the parts that cannot be read."""
    tables, bad = [], []
    for i, f in enumerate(files):
        try:
            schema = storage.parquet_schema(f)
        except (OSError, pa.ArrowException) as e:  # a truncated part left by a killed local writer
            logger.warning("[encode] %s: unreadable part (%s); deleting it, its rows are encoded again", f, e)
            bad.append(f)
            continue
        _check_part(schema, f)
        t = storage.read_parquet_file(f, columns=KEY_COLUMNS)
        tables.append(t.append_column("_file", pa.array(np.full(t.num_rows, i, np.int32)))
                      .append_column("_dim", pa.array(np.full(t.num_rows, _dim(schema), np.int32))))
    return tables, bad


def plan_folder(folder: str, want: pa.Table) -> FolderPlan:
    """Keep the existing rows of ``folder`` that ``want`` (id, encode_key; one row per id) asks
    for, one per id; rewrite the parts that hold anything else. Returns what is reused."""
    files = part_files(folder)
    plan = FolderPlan(input_rows=want.num_rows)
    tables, plan.unreadable_parts = _existing_keys(files)
    if tables:
        ex = pa.concat_tables(tables)
        dims = ex.column("_dim").to_numpy()
        if len(np.unique(dims)) > 1:  # an encoder change left parts of another width: keep the majority's
            vals, counts = np.unique(dims, return_counts=True)
            ex = ex.filter(pa.array(dims == vals[np.argmax(counts)]))
        n_all = sum(t.num_rows for t in tables)
        rows_per_file = np.zeros(len(files), dtype=np.int64)
        for t in tables:
            if t.num_rows:
                rows_per_file[t.column("_file")[0].as_py()] = t.num_rows
        ex = ex.append_column("_row", pa.array(np.arange(ex.num_rows, dtype=np.int64)))
        matched = ex.join(want.select(KEY_COLUMNS), keys=KEY_COLUMNS, join_type="left semi")
        ids = matched.column("id").to_numpy()
        rows = matched.column("_row").to_numpy()
        order = np.lexsort((rows, ids))
        first = np.ones(len(order), dtype=bool)
        first[1:] = ids[order][1:] != ids[order][:-1]
        keep_rows = np.sort(rows[order][first])
        keep = np.zeros(ex.num_rows, dtype=bool)
        keep[keep_rows] = True
        kept = ex.filter(pa.array(keep))
        plan.kept = kept.select(KEY_COLUMNS)
        plan.reused = kept.num_rows
        plan.dropped_rows = n_all - kept.num_rows
        _rewrite(folder, files, rows_per_file, ex, keep, plan)
    for f in plan.unreadable_parts:
        storage.delete_file(f)
    return plan


def _rewrite(folder: str, files: list[str], rows_per_file: np.ndarray, ex: pa.Table, keep: np.ndarray,
             plan: FolderPlan) -> None:
    """Rewrite every part that holds a row not kept (``rows_per_file``: rows each readable part
    holds). New parts are written before the old ones go, so a crash in between only leaves
    duplicates, which the next plan drops."""
    file_of = ex.column("_file").to_numpy()
    kept_by_file = np.bincount(file_of[keep], minlength=len(files))
    dirty = [i for i in range(len(files)) if rows_per_file[i] != kept_by_file[i]]
    written = set()
    for i in dirty:
        if kept_by_file[i]:
            t = storage.read_parquet_file(files[i])
            written.add(write_part(t.filter(pa.array(keep[file_of == i])), folder))
    for i in dirty:
        if files[i] not in written:
            storage.delete_file(files[i])
    plan.rewritten_parts = len(dirty)
    if dirty:
        logger.warning("[encode] %s: %d parts held stale/duplicate rows; %d rows kept, %d dropped",
                       folder, len(dirty), plan.reused, plan.dropped_rows)


def load_embeddings(folder: str, kind: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, dim]) of an embeddings folder, sorted by id.

    This is what the recommender and the serving graph read. ``kind`` filters item/user rows.
    """
    table = read_parts(folder)
    if table is None:
        raise FileNotFoundError(f"{folder}: no embeddings parts (run `slim-ray encode` first)")
    if kind is not None:
        table = table.filter(pc.equal(table.column("kind"), kind))
    dim = _dim(table.schema)
    ids = table.column("id").to_numpy()
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vecs = np.asarray(flat, dtype=np.float32).reshape(-1, dim)
    order = np.argsort(ids, kind="stable")
    ids, vecs = ids[order], vecs[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        raise ValueError(f"{folder}: duplicate ids {ids[1:][np.diff(ids) == 0][:5].tolist()}")
    return ids, vecs
