"""Recommender training at scale: per-user rows reach each Ray Train worker through Ray Data.

``rec.ingest`` picks how a run's users reach the workers (docs/rec.md, "Training at scale"):

    memory   every worker reads the whole sequences contract and the rationale table (small data:
             a fixed global batch order, 1 and N workers take the same steps)
    dataset  the run's user state (``slim_ray.data.userstate``: sorted user ids, histories,
             rationale vectors, each rationale's prefix_len, as memory-mapped NumPy files built
             part by part in one Ray task) is read by a Ray Dataset of user rows; the TorchTrainer
             splits it (``DataConfig``: ``streaming_split(equal=True)``) and each worker iterates its
             shard with ``ray.train.get_dataset_shard``. No worker holds all users; nothing per-user
             is a module buffer or is broadcast.
    auto     dataset when the sequences contract has more than ``rec.ingest_min_users`` rows (counted
             from the Parquet footers), memory otherwise

The driver holds counts only: the state's URI, the number of users, those without a vector (and
the first ids), the vector width. The Dataset's source is one row per ``ROWS_PER_BLOCK`` users
(a range of state rows), expanded into user rows by a map task that memory-maps the state on its
node. The state is the one ``slim-ray serve`` maps, so serving a run reuses it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

from slim_ray import storage

#: users per block of the training Dataset (one map task reads that many state rows)
ROWS_PER_BLOCK = 16384
#: fallback user ids named in meta.json and in errors
FIRST_IDS = 20


def count_users(sequences: str) -> int:
    """Rows of the sequences contract, from the Parquet footers (no row is read)."""
    from slim_ray.rec.data import sequence_row_groups

    return sum(sum(rows) for _, rows in sequence_row_groups(sequences))


def resolve_ingest(ingest: str, min_users: int, sequences: str, max_users: Optional[int] = None) -> str:
    """``memory`` or ``dataset`` for ``rec.ingest`` (``auto``: by the number of users; ``memory``
    under ``rec.max_users``, which only memory mode reads)."""
    if ingest == "dataset" and max_users is not None:
        raise ValueError("rec.max_users applies to rec.ingest=memory; unset it for rec.ingest=dataset")
    if ingest != "auto":
        return ingest
    if max_users is not None or not storage.exists(sequences):
        return "memory"  # a missing folder is reported by the stage, naming the fix
    return "dataset" if count_users(sequences) > min_users else "memory"


def state_role(spec: dict[str, Any]) -> str:
    """The user-state role of a run: its rationale role, ``none`` for runs without rationales."""
    return spec["role"] if spec.get("user_embeddings") else "none"


def prepare_state(run_root: str, spec: dict[str, Any], n_items: Optional[int]) -> dict[str, Any]:
    """Runs as a Ray task: build (or find) the run's user state, then count from it what the driver
    and the workers need. Raises naming the users when the inputs break the run's rules
    (``missing_rationale=error``; a rationale cut past a user's training prefix)."""
    from slim_ray.data import splits, userstate
    from slim_ray.rec.config import base_role
    from slim_ray.rec.data import MissingRationales, cut_past_prefix

    role = state_role(spec)
    # the cut of an ablation role's vector (student-step1) is its base role's rationale's prefix_len
    uri = userstate.ensure_published(run_root, role, vectors=role != "none",
                                     rationales_role=base_role(role) if role != "none" else None)
    st = userstate.UserState.open(storage.local_copy(uri))
    lens = np.diff(st.history_offsets)
    trainable = lens >= 3
    info: dict[str, Any] = {"state": uri, "users": int(trainable.sum()), "rows": len(st),
                            "max_user_id": int(st.user_ids[-1]) if len(st) else 0, "dim": int(st.vectors.shape[1]),
                            "fallback": 0, "fallback_ids": []}
    if not info["users"]:
        raise ValueError(f"{spec['sequences']}: no user has 3 or more items (leave-one-out needs train, valid, test)")
    items = st.history_items
    if len(items) and (int(items.min()) <= 0 or (n_items is not None and int(items.max()) > n_items)):
        bad = int(items.min()) if int(items.min()) <= 0 else int(items.max())
        raise ValueError(f"{spec['sequences']}: item id {bad} outside 1..{n_items} (0 is padding)")
    info["n_items"] = int(n_items if n_items is not None else (items.max() if len(items) else 0))
    if role != "none":
        missing = np.flatnonzero(trainable & ~np.asarray(st.has_vector))
        info["fallback"], info["fallback_ids"] = len(missing), st.user_ids[missing[:FIRST_IDS]].tolist()
        if len(missing) and spec["missing_rationale"] == "error":
            raise MissingRationales.of(spec["user_embeddings"], len(missing), info["users"], info["fallback_ids"])
        if spec.get("rationale_protocol") == "consistent":
            train_len = np.maximum(lens - splits.HELD_OUT, 0)  # splits.training_length, per user
            bad = np.flatnonzero(trainable & (np.asarray(st.rationale_prefix_len) > train_len))
            if len(bad):
                raise cut_past_prefix(spec["rationales"], len(bad), st.user_ids[bad[:5]].tolist())
    if (spec["hp"].get("sampled_distribution") or "uniform") == "popularity":
        info["item_counts"] = training_item_counts(st, info["n_items"]).tolist()  # one entry per item
    return info


def training_item_counts(st, n_items: int) -> np.ndarray:
    """[n_items + 1]: occurrences of each item in the users' training prefixes (``s[:-2]``; valid and
    test targets are never counted), ``ROWS_PER_BLOCK`` users at a time."""
    from slim_ray.data import splits

    counts = np.zeros(n_items + 1, np.int64)
    off = np.asarray(st.history_offsets)
    for a in range(0, len(st), ROWS_PER_BLOCK):
        b = min(a + ROWS_PER_BLOCK, len(st))
        lens = np.diff(off[a:b + 1])
        pos = np.arange(off[a], off[b])
        in_prefix = pos < np.repeat(off[a + 1:b + 1] - splits.HELD_OUT, lens)
        counts += np.bincount(np.asarray(st.history_items[off[a]:off[b]])[in_prefix], minlength=n_items + 1)[: n_items + 1]
    return counts


# ----------------------------------------------------------------------------- the Dataset


def _state_rows(batch: dict[str, np.ndarray], uri: str) -> pa.Table:
    """Map task: the user rows of state rows [lo, hi) (users with >= 3 items), with their rationale
    vector, whether they have one, and its cut."""
    from slim_ray.data import userstate

    st = userstate.UserState.open(storage.local_copy(uri))
    tables = []
    for lo, hi in zip(batch["lo"].tolist(), batch["hi"].tolist()):
        off = np.asarray(st.history_offsets[lo:hi + 1])
        lens = np.diff(off)
        keep = lens >= 3
        items = pa.ListArray.from_arrays(pa.array(off - off[0], pa.int32()),
                                         pa.array(np.asarray(st.history_items[off[0]:off[-1]]), pa.int64()))
        cols = {"user_id": pa.array(np.asarray(st.user_ids[lo:hi])), "item_ids": items,
                "cut": pa.array(np.asarray(st.rationale_prefix_len[lo:hi])),
                "has_vector": pa.array(np.asarray(st.has_vector[lo:hi]))}
        dim = st.vectors.shape[1]
        if dim:
            flat = np.ascontiguousarray(st.vectors[lo:hi], np.float32).reshape(-1)
            cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
        tables.append(pa.table(cols).filter(pa.array(keep)))
    return pa.concat_tables(tables)


def user_rows(info: dict[str, Any], readers: int):
    """A Ray Dataset of the state's user rows: user_id, item_ids, cut, has_vector[, vector].

    ``readers`` caps the map tasks running at once. They ask for no CPU (the Train workers hold
    the CPUs; reading mapped rows is I/O, not compute), so without a cap Ray Data starts one task
    per block at once: at 1M users that is 61 worker processes competing with training."""
    import ray

    ranges = [{"lo": a, "hi": min(a + ROWS_PER_BLOCK, info["rows"])} for a in range(0, info["rows"], ROWS_PER_BLOCK)]
    return ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(
        _state_rows, fn_kwargs={"uri": info["state"]}, batch_size=1, batch_format="numpy", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=max(1, readers)))


# ----------------------------------------------------------------------------- on a worker


class UserChunk:
    """One batch of user rows on a worker, in the shape ``slim_ray.rec.data`` builds examples from.

    Users are numbered 0..n-1 inside the chunk (``data.user_ids``), so ``cuts`` and ``vectors`` are
    indexed by that number; ``user_ids`` keeps the real ids."""

    def __init__(self, batch: pa.Table, n_items: int):
        from slim_ray.rec.data import RecData

        self.user_ids = batch.column("user_id").to_numpy()
        lists = batch.column("item_ids").combine_chunks()
        off = lists.offsets.to_numpy()
        flat = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
        seqs = [flat[off[i]:off[i + 1]] for i in range(len(self.user_ids))]
        n = len(seqs)
        self.data = RecData(np.arange(n, dtype=np.int64), seqs, n_items, max(0, n - 1))
        self.cuts = batch.column("cut").to_numpy()
        self.has = batch.column("has_vector").to_numpy(zero_copy_only=False).astype(bool)
        self.vectors = None
        if "vector" in batch.column_names:
            vec = batch.column("vector").combine_chunks()
            dim = vec.type.list_size
            self.vectors = np.asarray(vec.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, dim)

    def __len__(self) -> int:
        return len(self.user_ids)


def iter_chunks(shard, n_items: int, users: int, shuffle_buffer: Optional[int] = None):
    """UserChunks of ``users`` rows from a worker's dataset shard (one Ray Data epoch)."""
    for batch in shard.iter_batches(batch_size=users, batch_format="pyarrow", prefetch_batches=1,
                                    local_shuffle_buffer_size=shuffle_buffer):
        if batch.num_rows:
            yield UserChunk(batch, n_items)


def user_table_file(info: dict[str, Any], path: str):
    """(user_text [max_user_id + 1, D], has [max_user_id + 1]) indexed by user id, as tensors over a
    file-backed array at ``path``: what a self-contained model.pt stores. Filled from the state in
    blocks, so the table is written through the page cache, not held as anonymous memory."""
    import torch

    from slim_ray.data import userstate

    st = userstate.UserState.open(storage.local_copy(info["state"]))
    n = info["max_user_id"] + 1
    table = np.lib.format.open_memmap(path, "w+", np.float32, (n, info["dim"]))
    has = np.zeros(n, bool)
    for a in range(0, len(st), ROWS_PER_BLOCK):
        b = min(a + ROWS_PER_BLOCK, len(st))
        ids = np.asarray(st.user_ids[a:b])
        table[ids] = st.vectors[a:b]
        has[ids] = st.has_vector[a:b]
    table.flush()
    return torch.from_numpy(table), torch.from_numpy(has)
