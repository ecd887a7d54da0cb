"""The rationales output folder: parts, the done set, compaction and the folder's totals.

Layout of ``rationales/<role>/`` (a local folder or a storage URI, see ``slim_ray.storage``):
``part-<hash>.parquet`` files, each published in one piece by ``storage.write_table`` (temp name +
move on a local disk, a single PUT on an object store); the part name is a hash of its keys, so a
retried task rewrites the same object instead of adding a copy. A crash loses at most the rows not
yet in a part. Parts are large (``GenerateConfig.rows_per_file``, 100k rows by default, or the whole
stage output when it is smaller): an object store and Ray Data both work best with few big files.

Identity of a row: the pair (user_id, rationale_key), hashed to one int64 (``pair_hash``) so the
done set of a million users is 8 MB, shipped once to the prompt workers.

A part that does not read back (a damaged disk, a partial copy) is deleted when a run starts
(``drop_unreadable_parts``), so its rows are generated again instead of failing every rerun.

``compact(out_dir, wanted)`` runs after each run: it keeps exactly one row per wanted pair (a
success beats an earlier failure; later duplicates are dropped) and removes rows of pairs the
current config no longer produces (another prompt version, model or sampling). It reads one part at
a time and rewrites only the parts that change. ``folder_totals`` then counts done and failed rows
and sums tokens over the successful rows, again part by part: these are the running totals across
resumes, each successful row counted once.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray import storage
from slim_ray.data.schemas import RATIONALES_SCHEMA
from slim_ray.generate.grounding import GROUNDING_FIELDS

logger = logging.getLogger(__name__)

#: The rationales contract plus the parser's flags.
OUTPUT_SCHEMA = pa.schema(
    list(RATIONALES_SCHEMA)
    + [
        pa.field("steps_found", pa.int64()),  # 0..3: how many of Step 1/2/3 the answer has
        pa.field("seen_items", pa.list_(pa.string())),  # history titles the answer recommends again
        pa.field("engine", pa.string()),
        pa.field("node_id", pa.string()),  # the Ray node that generated the row (summary: nodes used)
    ]
    + GROUNDING_FIELDS  # Step 3's items as catalog ids (slim_ray.generate.grounding)
)


def pair_hash(user_ids: Iterable[int], keys: Iterable[str]) -> np.ndarray:
    """int64 identity of (user_id, rationale_key) pairs."""
    out = [
        int.from_bytes(hashlib.blake2b(f"{int(u)}:{k}".encode(), digest_size=8).digest(), "little", signed=True)
        for u, k in zip(user_ids, keys)
    ]
    return np.asarray(out, dtype=np.int64)


def part_files(out_dir: str) -> list[str]:
    """URIs of the published parts (temp objects are hidden names and never listed)."""
    return [f for f in storage.list_files(out_dir, suffix=".parquet") if storage.basename(f).startswith("part-")]


def remove_temp_files(out_dir: str) -> int:
    """Temp files of parts that a killed run did not finish."""
    return storage.remove_temp_files(out_dir)


def drop_unreadable_parts(out_dir: str) -> list[str]:
    """Delete the parts that do not read back in full (a damaged disk, a partial copy into the run
    folder), so that their rows count as missing and are generated again. Returns their URIs.

    Every later step (done set, compaction, totals) reads these parts; without this, one damaged
    part would fail every rerun of the stage."""
    bad = []
    for f in part_files(out_dir):
        try:
            storage.read_parquet_file(f)
        except (OSError, pa.ArrowException) as e:
            logger.warning("%s: unreadable part (%s: %s); deleting it, its rows are generated again",
                           f, type(e).__name__, e)
            storage.delete_file(f)
            bad.append(f)
    return bad


def write_part(table: pa.Table, out_dir: str) -> str:
    """Write finished rows as one part (name derived from its keys). Returns its URI."""
    table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    h = hashlib.sha256()
    for u, k in zip(table["user_id"].to_pylist(), table["rationale_key"].to_pylist()):
        h.update(f"{u}:{k};".encode())
    uri = storage.join(out_dir, f"part-{h.hexdigest()[:20]}.parquet")
    storage.write_table(table, uri)
    return uri


def _hashes(t: pa.Table) -> np.ndarray:
    return pair_hash(t["user_id"].to_pylist(), t["rationale_key"].to_pylist())


def _is_error(t: pa.Table) -> np.ndarray:
    return np.asarray(pc.is_valid(t["error"]).to_numpy(zero_copy_only=False), dtype=bool)


def done_pairs(out_dir: str) -> np.ndarray:
    """Sorted int64 hashes of the pairs that already have a successful row (error is null)."""
    chunks = []
    for f in part_files(out_dir):
        t = storage.read_parquet_file(f, columns=["user_id", "rationale_key", "error"])
        ok = t.filter(pc.is_null(t["error"]))
        if ok.num_rows:
            chunks.append(_hashes(ok))
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)


def _isin(hashes: np.ndarray, sorted_arr: np.ndarray) -> np.ndarray:
    """Vectorised membership of ``hashes`` in a sorted unique array."""
    if len(sorted_arr) == 0:
        return np.zeros(len(hashes), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_arr, hashes), len(sorted_arr) - 1)
    return sorted_arr[i] == hashes


class _KeptSet:
    """The pairs already kept by compaction: a bit per wanted pair, or (when the wanted set is
    unknown) a sorted array grown part by part. Never a Python object per row."""

    def __init__(self, wanted_sorted: Optional[np.ndarray]):
        self.wanted = wanted_sorted
        self.bits = None if wanted_sorted is None else np.zeros(len(wanted_sorted), dtype=bool)
        self.seen = np.zeros(0, dtype=np.int64)

    def contains(self, h: np.ndarray) -> np.ndarray:
        if self.bits is not None:
            return self.bits[np.searchsorted(self.wanted, h)]
        return _isin(h, self.seen)

    def add(self, h: np.ndarray) -> None:
        if self.bits is not None:
            self.bits[np.searchsorted(self.wanted, h)] = True
        else:
            self.seen = np.union1d(self.seen, h)


def _first_occurrence(h: np.ndarray) -> np.ndarray:
    """True at the first occurrence of each value (order of the array)."""
    first = np.zeros(len(h), dtype=bool)
    first[np.unique(h, return_index=True)[1]] = True
    return first


def compact(out_dir: str, wanted: Optional[np.ndarray]) -> dict[str, int]:
    """Keep one row per wanted pair (success over failure, first over later). Returns counts.

    Part by part: the driver holds one part and the int64 pair sets, never all rows."""
    wanted_sorted = None if wanted is None else np.unique(wanted)
    succeeded = done_pairs(out_dir)
    kept = _KeptSet(wanted_sorted)
    stats = {"rows": 0, "dropped_stale": 0, "dropped_duplicate": 0, "dropped_superseded_error": 0, "errors": 0}
    for f in part_files(out_dir):
        # the keys decide; the whole part (prompts, texts) is read only when it must be rewritten
        t = storage.read_parquet_file(f, columns=["user_id", "rationale_key", "error"])
        h = _hashes(t)
        is_err = _is_error(t)
        stale = np.zeros(len(h), dtype=bool) if wanted_sorted is None else ~_isin(h, wanted_sorted)
        superseded = ~stale & is_err & _isin(h, succeeded)
        candidate = ~stale & ~superseded
        # a candidate row is a duplicate when its pair was kept from an earlier part, or when it
        # is not the first candidate of its pair inside this part
        dup = np.zeros(len(h), dtype=bool)
        idx = np.flatnonzero(candidate)
        if len(idx):
            dup[idx] = kept.contains(h[idx]) | ~_first_occurrence(h[idx])
        keep = candidate & ~dup
        kept.add(h[keep])
        stats["dropped_stale"] += int(stale.sum())
        stats["dropped_superseded_error"] += int(superseded.sum())
        stats["dropped_duplicate"] += int(dup.sum())
        stats["errors"] += int((keep & is_err).sum())
        stats["rows"] += int(keep.sum())
        if keep.all():
            continue
        if not keep.any():
            storage.delete_file(f)
        else:
            storage.write_table(storage.read_parquet_file(f).filter(pa.array(keep)), f)
    return stats


def folder_totals(out_dir: str, wanted: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Counts and token sums of the folder (after ``compact``: one row per pair), part by part.

    ``done_rows``: pairs with a successful row; ``failed_rows``: pairs whose only row has an error;
    ``missing_rows``: wanted pairs with no row at all (0 after a run that finished). Tokens are
    summed over the successful rows only, so a row retried after a failure counts once."""
    cols = ["user_id", "rationale_key", "error", "steps_found", "seen_items", "n_prompt_tokens", "n_output_tokens"]
    tot = {"rows": 0, "done_rows": 0, "failed_rows": 0, "prompt_tokens": 0, "output_tokens": 0,
           "all_three_steps": 0, "seen": 0, "step3_grounded": 0, "step3_naming_history": 0,
           "step3_items": 0, "step3_history_items": 0}
    done_hashes = []
    nodes: set[str] = set()
    for f in part_files(out_dir):
        names = storage.parquet_schema(f).names
        has_node = "node_id" in names  # parts written before the column existed
        grounded = "step3_item_ids" in names  # parts written before grounding
        extra = ["node_id"] * has_node + ["step3_item_ids", "step3_grounded", "step3_n_history"] * grounded
        t = storage.read_parquet_file(f, columns=cols + extra)
        if has_node:
            nodes.update(x for x in pc.unique(t["node_id"]).to_pylist() if x)
        is_err = _is_error(t)
        ok = t.filter(pa.array(~is_err))
        tot["rows"] += t.num_rows
        tot["done_rows"] += ok.num_rows
        tot["failed_rows"] += int(is_err.sum())
        tot["prompt_tokens"] += int(pc.sum(ok["n_prompt_tokens"]).as_py() or 0)
        tot["output_tokens"] += int(pc.sum(ok["n_output_tokens"]).as_py() or 0)
        tot["all_three_steps"] += int(pc.sum(pc.equal(ok["steps_found"], 3)).as_py() or 0)
        tot["seen"] += int(pc.sum(pc.greater(pc.list_value_length(ok["seen_items"]), 0)).as_py() or 0)
        if grounded:
            tot["step3_grounded"] += int(pc.sum(pc.fill_null(ok["step3_grounded"], False)).as_py() or 0)
            tot["step3_naming_history"] += int(pc.sum(pc.greater(ok["step3_n_history"], 0)).as_py() or 0)
            tot["step3_items"] += int(pc.sum(pc.list_value_length(ok["step3_item_ids"])).as_py() or 0)
            tot["step3_history_items"] += int(pc.sum(ok["step3_n_history"]).as_py() or 0)
        if wanted is not None:
            done_hashes.append(_hashes(t))
    if wanted is not None:
        have = np.unique(np.concatenate(done_hashes)) if done_hashes else np.zeros(0, dtype=np.int64)
        tot["missing_rows"] = int((~_isin(np.unique(wanted), have)).sum())
    tot["node_ids"] = sorted(nodes)
    return tot
