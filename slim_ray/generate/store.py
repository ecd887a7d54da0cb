"""The rationales output folder: incremental parts, the done set, and compaction.

Layout of ``rationales/<role>/``: ``part-<hash>.parquet`` files, each written atomically (temp file
+ rename) by the writer task of one batch; the part name is a hash of its keys, so a retried task
rewrites the same file instead of adding a copy. A crash loses at most the rows not yet in a part.

Identity of a row: the pair (user_id, rationale_key), hashed to one int64 (``pair_hash``) so the
done set of a million users is 8 MB, shipped once to the prompt workers.

``compact(out_dir, wanted)`` runs after a successful run: it keeps exactly one row per wanted pair
(a success beats an earlier failure; later duplicates are dropped) and removes rows of pairs the
current config no longer produces (another prompt version, model or sampling). Only the parts that
change are rewritten, each atomically.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from slim_ray.data.schemas import RATIONALES_SCHEMA

#: The rationales contract plus the parser's flags.
OUTPUT_SCHEMA = pa.schema(
    list(RATIONALES_SCHEMA)
    + [
        pa.field("steps_found", pa.int64()),  # 0..3: how many of Step 1/2/3 the answer has
        pa.field("seen_items", pa.list_(pa.string())),  # history titles the answer recommends again
        pa.field("engine", pa.string()),
    ]
)


def pair_hash(user_ids: Iterable[int], keys: Iterable[str]) -> np.ndarray:
    """int64 identity of (user_id, rationale_key) pairs."""
    out = [
        int.from_bytes(hashlib.blake2b(f"{int(u)}:{k}".encode(), digest_size=8).digest(), "little", signed=True)
        for u, k in zip(user_ids, keys)
    ]
    return np.asarray(out, dtype=np.int64)


def part_files(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    return sorted(
        os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("part-") and f.endswith(".parquet")
    )


def remove_temp_files(out_dir: str) -> int:
    """Temp files of parts that a killed run did not finish."""
    n = 0
    if os.path.isdir(out_dir):
        for f in os.listdir(out_dir):
            if f.startswith(".part-") and f.endswith(".tmp"):
                os.remove(os.path.join(out_dir, f))
                n += 1
    return n


def _write_atomic(table: pa.Table, path: str) -> None:
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_part(table: pa.Table, out_dir: str) -> str:
    """Write one batch of finished rows as a part (name derived from its keys). Returns the path."""
    table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    h = hashlib.sha256()
    for u, k in zip(table["user_id"].to_pylist(), table["rationale_key"].to_pylist()):
        h.update(f"{u}:{k};".encode())
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"part-{h.hexdigest()[:20]}.parquet")
    _write_atomic(table, path)
    return path


def done_pairs(out_dir: str) -> np.ndarray:
    """Sorted int64 hashes of the pairs that already have a successful row (error is null)."""
    chunks = []
    for f in part_files(out_dir):
        t = pq.read_table(f, columns=["user_id", "rationale_key", "error"])
        ok = t.filter(pc.is_null(t["error"]))
        if ok.num_rows:
            chunks.append(pair_hash(ok["user_id"].to_pylist(), ok["rationale_key"].to_pylist()))
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)


def compact(out_dir: str, wanted: Optional[np.ndarray]) -> dict[str, int]:
    """Keep one row per wanted pair (success over failure, first over later). Returns counts."""
    files = part_files(out_dir)
    wanted_sorted = None if wanted is None else np.unique(wanted)
    succeeded = done_pairs(out_dir)
    kept_pairs: set[int] = set()
    stats = {"rows": 0, "dropped_stale": 0, "dropped_duplicate": 0, "dropped_superseded_error": 0, "errors": 0}
    for f in files:
        t = pq.read_table(f)
        hashes = pair_hash(t["user_id"].to_pylist(), t["rationale_key"].to_pylist())
        is_err = np.asarray(pc.is_valid(t["error"]).to_numpy(zero_copy_only=False), dtype=bool)
        keep = np.ones(t.num_rows, dtype=bool)
        for i, h in enumerate(hashes):
            h = int(h)
            if wanted_sorted is not None and not _isin(h, wanted_sorted):
                keep[i] = False
                stats["dropped_stale"] += 1
            elif is_err[i] and _isin(h, succeeded):
                keep[i] = False
                stats["dropped_superseded_error"] += 1
            elif h in kept_pairs:
                keep[i] = False
                stats["dropped_duplicate"] += 1
            else:
                kept_pairs.add(h)
                stats["errors"] += int(is_err[i])
        stats["rows"] += int(keep.sum())
        if keep.all():
            continue
        if not keep.any():
            os.remove(f)
        else:
            _write_atomic(t.filter(pa.array(keep)), f)
    return stats


def _isin(h: int, sorted_arr: np.ndarray) -> bool:
    i = np.searchsorted(sorted_arr, h)
    return bool(i < len(sorted_arr) and sorted_arr[i] == h)
