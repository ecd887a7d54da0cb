"""The preparation transformation on plain Arrow tables (no Ray here).

The Ray stage (``slim_ray.data.stage``) applies these functions to blocks in parallel; the
single-process reference (``prepare_tables``) applies the very same functions to one whole table,
which is what the tests compare against and what ``bench/prepare.py`` measures Ray against.

Steps and their rules:

1. **Vocabularies.** The distinct user keys and item keys, ordered by key (numerically when every
   key is an integer, e.g. MovieLens ids; otherwise by string). ``max_users`` keeps the first N.
2. **Encode.** Keys -> vocabulary positions; ``min_rating`` filter.
3. **k-core** (iterative, until stable): a user stays if it has >= ``min_user_count`` interactions
   with surviving items, an item if it has >= ``min_item_count`` with surviving users. Each pass
   counts both sides over all rows, then prunes; the fixpoint is the unique largest k-core.
4. **Dense ids.** Survivors numbered 1..U and 1..N in vocabulary order (0 = padding).
5. **Sequences.** Per user, interactions sorted by (timestamp, ord): ``ord`` is the position in the
   source files, so equal timestamps keep file order (stable, documented tie-break). The most recent
   ``max_seq_len`` are kept. Leave-one-out is implicit: train = item_ids[:-2], valid = [-2], test = [-1].
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray.data import splits
from slim_ray.data.readers import ITEM_META_SCHEMA
from slim_ray.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from slim_ray.data.text import clean_text, dedup_keep_order, render_text, split_title_year

ENCODED_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int64()),
        pa.field("item_idx", pa.int64()),
        pa.field("timestamp", pa.int64()),
        pa.field("ord", pa.int64()),
        pa.field("bucket", pa.int64()),
    ]
)


# --------------------------------------------------------------------------- vocabularies


def unique_keys(table: pa.Table) -> pa.Table:
    """Distinct user and item keys of a block: columns key (string), is_user (bool)."""
    u = pc.unique(table.column("user_key")) if table.num_rows else pa.array([], pa.string())
    i = pc.unique(table.column("item_key")) if table.num_rows else pa.array([], pa.string())
    if isinstance(u, pa.ChunkedArray):
        u = u.combine_chunks()
    if isinstance(i, pa.ChunkedArray):
        i = i.combine_chunks()
    return pa.table({"key": pa.concat_arrays([u, i]),
                     "is_user": pa.array(np.r_[np.ones(len(u), bool), np.zeros(len(i), bool)])})


def ordered_vocab(keys) -> pa.Array:
    """Distinct keys in key order: numerically when all are integers, else lexicographically."""
    keys = pc.unique(pa.chunked_array([keys]) if isinstance(keys, pa.Array) else keys)
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = pc.cast(keys, pa.string())
    try:
        nums = pc.cast(keys, pa.int64())
        t = pa.table({"n": nums, "k": keys}).sort_by([("n", "ascending"), ("k", "ascending")])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        t = pa.table({"k": keys}).sort_by([("k", "ascending")])
    return t.column("k").combine_chunks()


# --------------------------------------------------------------------------- encode + k-core


def encode_block(
    table: pa.Table, user_vocab: pa.Array, item_vocab: pa.Array, num_buckets: int,
    min_rating: Optional[float] = None,
) -> pa.Table:
    """Keys -> vocabulary positions (rows of users outside the vocabulary are dropped) + user bucket."""
    if min_rating is not None:
        table = table.filter(pc.fill_null(pc.greater_equal(table.column("rating"), min_rating), False))
    u = pc.index_in(table.column("user_key"), value_set=user_vocab)
    i = pc.index_in(table.column("item_key"), value_set=item_vocab)
    keep = pc.and_(pc.is_valid(u), pc.is_valid(i))
    u = pc.cast(pc.filter(u, keep), pa.int64()).to_numpy(zero_copy_only=False)
    i = pc.cast(pc.filter(i, keep), pa.int64()).to_numpy(zero_copy_only=False)
    ts = pc.filter(table.column("timestamp"), keep)
    ords = pc.filter(table.column("ord"), keep)
    n_users = max(1, len(user_vocab))
    bucket = (u * num_buckets) // n_users  # contiguous user ranges: each bucket's output is sorted
    return pa.table({"user_idx": u, "item_idx": i, "timestamp": ts, "ord": ords, "bucket": bucket},
                    schema=ENCODED_SCHEMA)


def dedup_rows(table: pa.Table) -> pa.Table:
    """Drop repeated (user, item, timestamp) rows, keeping the first in file order."""
    if table.num_rows < 2:
        return table
    t = table.sort_by([("user_idx", "ascending"), ("item_idx", "ascending"), ("timestamp", "ascending"),
                       ("ord", "ascending")])
    u, i, ts = (t.column(c).to_numpy() for c in ("user_idx", "item_idx", "timestamp"))
    first = np.ones(len(u), bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1]) | (ts[1:] != ts[:-1])
    return t.filter(pa.array(first))


def kcore_counts(table: pa.Table, user_alive: np.ndarray, item_alive: np.ndarray) -> pa.Table:
    """Interactions per user and per item among rows whose user and item are both alive.

    Sparse output (is_user, idx, n) so the driver only receives vocabulary-sized data.
    """
    u = table.column("user_idx").to_numpy()
    i = table.column("item_idx").to_numpy()
    m = user_alive[u] & item_alive[i]
    uu, uc = np.unique(u[m], return_counts=True)
    ii, ic = np.unique(i[m], return_counts=True)
    return pa.table({
        "is_user": np.r_[np.ones(len(uu), bool), np.zeros(len(ii), bool)],
        "idx": np.r_[uu, ii].astype(np.int64),
        "n": np.r_[uc, ic].astype(np.int64),
    })


class KCore:
    """Driver-side state of the iterative k-core: feed it each pass's counts, ask whether it moved."""

    def __init__(self, n_users: int, n_items: int, min_user_count: int, min_item_count: int):
        self.user_alive = np.ones(n_users, bool)
        self.item_alive = np.ones(n_items, bool)
        self.min_user = max(3, min_user_count)  # leave-one-out needs train + valid + test
        self.min_item = min_item_count
        self.passes = 0
        self._reset()

    def _reset(self) -> None:
        self.ucount = np.zeros(len(self.user_alive), np.int64)
        self.icount = np.zeros(len(self.item_alive), np.int64)

    def add(self, counts: pa.Table) -> None:
        is_user = counts.column("is_user").to_numpy(zero_copy_only=False)
        idx = counts.column("idx").to_numpy()
        n = counts.column("n").to_numpy()
        np.add.at(self.ucount, idx[is_user], n[is_user])
        np.add.at(self.icount, idx[~is_user], n[~is_user])

    def step(self) -> bool:
        """Prune by this pass's counts; True when nothing changed (the fixpoint is reached)."""
        self.passes += 1
        new_u = self.user_alive & (self.ucount >= self.min_user)
        new_i = self.item_alive & (self.icount >= self.min_item)
        stable = bool((new_u == self.user_alive).all() and (new_i == self.item_alive).all())
        self.user_alive, self.item_alive = new_u, new_i
        self.interactions = int(self.ucount[new_u].sum()) if stable else None
        self._reset()
        return stable

    def check_not_empty(self, where: str, max_users: Optional[int] = None) -> None:
        """The error for a log that k-core filters away entirely (names the inputs and settings)."""
        from slim_ray.data.readers import BadInputError

        if not self.user_alive.any() or not self.item_alive.any():
            raise BadInputError(
                f"{where}: no interactions left after k-core (min_user_count={self.min_user}, "
                f"min_item_count={self.min_item}, max_users={max_users}); lower them"
            )

    def new_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary position -> dense id (1..U / 1..N in vocabulary order; 0 for the pruned)."""
        uid = np.where(self.user_alive, np.cumsum(self.user_alive), 0).astype(np.int64)
        iid = np.where(self.item_alive, np.cumsum(self.item_alive), 0).astype(np.int64)
        return uid, iid


# --------------------------------------------------------------------------- sequences


def build_sequences(
    table: pa.Table, user_new: np.ndarray, item_new: np.ndarray, user_vocab: pa.Array,
    max_seq_len: Optional[int],
) -> pa.Table:
    """Rows of whole users -> one sequence row per surviving user (``SEQUENCES_SCHEMA``), by user_id."""
    u = table.column("user_idx").to_numpy()
    i = table.column("item_idx").to_numpy()
    keep = (user_new[u] > 0) & (item_new[i] > 0)
    t = table.filter(pa.array(keep))
    t = t.sort_by([("user_idx", "ascending"), ("timestamp", "ascending"), ("ord", "ascending")])
    u = t.column("user_idx").to_numpy()
    n = len(u)
    if n == 0:
        return SEQUENCES_SCHEMA.empty_table()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], n]
    if max_seq_len is not None:
        row_end = np.repeat(ends, ends - starts)
        recent = np.arange(n) >= row_end - max_seq_len
        lengths = np.minimum(ends - starts, max_seq_len)
    else:
        recent = np.ones(n, bool)
        lengths = ends - starts
    users = u[starts]
    items = item_new[t.column("item_idx").to_numpy()[recent]]
    ts = t.column("timestamp").to_numpy()[recent]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.table(
        {
            "user_id": pa.array(user_new[users], pa.int64()),
            "user_key": user_vocab.take(pa.array(users)),
            "item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items, pa.int64())),
            "timestamps": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ts, pa.int64())),
        },
        schema=SEQUENCES_SCHEMA,
    )


def leave_one_out(item_ids: list) -> tuple[list, object, object]:
    """(training prefix, validation target, test target): ``slim_ray.data.splits``, the one cut."""
    return splits.leave_one_out(list(item_ids))


# --------------------------------------------------------------------------- items


def select_items(meta: pa.Table, item_vocab: pa.Array, item_new: np.ndarray) -> pa.Table:
    """Metadata rows of surviving items, with their new ``item_id``."""
    pos = pc.index_in(meta.column("item_key"), value_set=item_vocab)
    pos_np = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False)
    ids = np.where(pos_np >= 0, item_new[np.maximum(pos_np, 0)], 0)
    keep = ids > 0
    return meta.filter(pa.array(keep)).append_column("item_id", pa.array(ids[keep], pa.int64()))


def finish_items(
    meta: pa.Table, item_vocab: pa.Array, item_new: np.ndarray, *,
    fields=("title", "year", "categories", "brand"), category_label: str = "Categories",
    max_title_chars: int = 200, max_description_chars: int = 300,
) -> tuple[pa.Table, dict]:
    """Surviving items' metadata (first row per item in file order wins) -> ``ITEMS_SCHEMA``.

    Items without metadata keep their key as the text's subject. Titles ending in ``(YYYY)`` give
    the year when the metadata has none.
    """
    if "item_id" not in meta.column_names:
        meta = select_items(meta, item_vocab, item_new)
    meta = meta.sort_by([("item_id", "ascending"), ("ord", "ascending")])
    ids = meta.column("item_id").to_numpy()
    first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
    meta = meta.filter(pa.array(first))
    by_id = {r["item_id"]: r for r in meta.to_pylist()}
    alive_pos = np.flatnonzero(item_new > 0)
    rows = {k: [] for k in ITEMS_SCHEMA.names}
    missing = 0
    for pos in alive_pos:
        iid = int(item_new[pos])
        key = item_vocab[int(pos)].as_py()
        r = by_id.get(iid)
        if r is None:
            missing += 1
            r = {}
        title = clean_text(r.get("title"), max_title_chars)
        year = r.get("year")
        bare, title_year = split_title_year(title)
        if title_year is not None and (year is None or year == title_year):
            title, year = bare, title_year
        cats = dedup_keep_order(clean_text(c, 80) for c in (r.get("categories") or []))
        brand = clean_text(r.get("brand"), 80)
        if brand and brand.lower().startswith("by "):
            brand = brand[3:].strip() or None
        desc = clean_text(r.get("description"), max_description_chars) if max_description_chars else None
        rows["item_id"].append(iid)
        rows["item_key"].append(key)
        rows["title"].append(title)
        rows["categories"].append(cats)
        rows["brand"].append(brand)
        rows["year"].append(year)
        rows["text"].append(render_text(title, cats, brand, year, desc, fields=fields,
                                        category_label=category_label, fallback=f"Item {key}"))
    return pa.table(rows, schema=ITEMS_SCHEMA), {"items_without_metadata": missing}


# --------------------------------------------------------------------------- single process


def prepare_tables(
    interactions: pa.Table, meta: Optional[pa.Table], *, min_user_count: int = 5, min_item_count: int = 5,
    max_seq_len: Optional[int] = 200, max_users: Optional[int] = None, min_rating: Optional[float] = None,
    dedup: bool = False, item_kwargs: Optional[dict] = None, where: str = "interactions",
) -> tuple[pa.Table, pa.Table, dict]:
    """The whole transformation in one process (reference for tests and the benchmark)."""
    keys = unique_keys(interactions)
    is_user = keys.column("is_user")
    user_vocab = ordered_vocab(keys.column("key").filter(is_user))
    item_vocab = ordered_vocab(keys.column("key").filter(pc.invert(is_user)))
    if max_users is not None:
        user_vocab = user_vocab.slice(0, max_users)
    enc = encode_block(interactions, user_vocab, item_vocab, 1, min_rating)
    if dedup:
        enc = dedup_rows(enc)
    kc = KCore(len(user_vocab), len(item_vocab), min_user_count, min_item_count)
    while True:
        kc.add(kcore_counts(enc, kc.user_alive, kc.item_alive))
        if kc.step():
            break
    kc.check_not_empty(where, max_users)
    user_new, item_new = kc.new_ids()
    seqs = build_sequences(enc, user_new, item_new, user_vocab, max_seq_len)
    items, info = finish_items(meta if meta is not None else ITEM_META_SCHEMA.empty_table(),
                               item_vocab, item_new, **(item_kwargs or {}))
    summary = {"users": seqs.num_rows, "items": items.num_rows, "interactions": kc.interactions,
               "kcore_passes": kc.passes, **info}
    return items, seqs, summary
