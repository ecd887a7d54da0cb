"""Sequences and text vectors -> the arrays the recommender trains and is evaluated on.

Leave-one-out on the ``sequences`` contract: for a user's item_ids ``s``,
training prefix = ``s[:-2]``, validation: ``s[:-2]`` -> ``s[-2]``, test: ``s[:-1]`` -> ``s[-1]``.
Users with fewer than 3 items are skipped (no training item). The backbone reads the most recent
``max_len`` items, right-padded with 0.

Positions: the target at index ``t`` of ``s`` is predicted from ``s[:t]``. Training examples record
that index (``target_pos``) so the rationale protocol can tell which targets a rationale written
from ``s[:c]`` may inform (``t >= c``; docs/rec.md, "Rationale protocol").

Every read goes through ``slim_ray.storage``: the run folder may be a path or a URI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray import storage
from slim_ray.data import splits
from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, SEQUENCES_SCHEMA, check_columns

PROTOCOLS = ("consistent", "leaky")


def _read_contract(path: str, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """Columns of a contract (file or folder of parts), checked against its schema, naming the path."""
    t = storage.read_table(path, columns=columns)
    if t is None:
        raise FileNotFoundError(f"{path}: no Parquet files")
    check_columns(t, pa.schema([schema.field(c) for c in columns]), path)
    return t


@dataclass
class RecData:
    user_ids: np.ndarray  # int64 [U]
    seqs: list  # list of int64 arrays (full item_ids, time order)
    n_items: int  # largest item id (ids are 1..n_items)
    n_users: int  # largest user id

    def __len__(self) -> int:
        return len(self.user_ids)


def _users_with_sequences(t: pa.Table) -> tuple[np.ndarray, list]:
    """(user ids, item-id arrays) of the users with >= 3 items of a (user_id, item_ids) table, by user_id."""
    t = t.sort_by("user_id")
    users = t.column("user_id").to_numpy()
    lists = t.column("item_ids").combine_chunks()
    offsets = lists.offsets.to_numpy()
    flat = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    seqs = [flat[offsets[i]:offsets[i + 1]] for i in range(len(users))]
    keep = np.array([len(s) >= 3 for s in seqs], dtype=bool)
    return (users[keep] if len(users) else users), [s for s, k in zip(seqs, keep) if k]


def _checked(source: str, users: np.ndarray, seqs: list, n_items: Optional[int]) -> RecData:
    """RecData after the checks every reader makes: ids >= 1, none above ``n_items``."""
    bad = [int(u) for u, s in zip(users, seqs) if (s <= 0).any()]
    if bad:
        raise ValueError(f"{source}: item_ids must be >= 1 (0 is padding); user_id {bad[:5]} break this")
    largest = max((int(s.max()) for s in seqs), default=0)
    if n_items is None:
        n_items = largest
    elif largest > n_items:
        raise ValueError(f"{source}: item id {largest} > number of items {n_items}")
    return RecData(np.asarray(users, dtype=np.int64), seqs, int(n_items), int(users.max()) if len(users) else 0)


def load_sequences(path: str, max_users: Optional[int] = None, n_items: Optional[int] = None) -> RecData:
    """Read the ``sequences`` contract (users with >= 3 items). ``n_items`` defaults to the largest id seen."""
    users, seqs = _users_with_sequences(_read_contract(path, SEQUENCES_SCHEMA, ["user_id", "item_ids"]))
    if max_users is not None:
        users, seqs = users[:max_users], seqs[:max_users]
    if not len(users):
        raise ValueError(f"{path}: no user has 3 or more items (leave-one-out needs train, valid, test)")
    return _checked(path, users, seqs, n_items)


def count_items(items_path: str) -> Optional[int]:
    """Largest item_id in the ``items`` contract (None when the folder is absent)."""
    if not storage.exists(items_path):
        return None
    ids = _read_contract(items_path, ITEMS_SCHEMA, ["item_id"]).column("item_id").to_numpy()
    return int(ids.max()) if len(ids) else None


def pad_right(rows: list, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the last ``max_len`` of each row, right-pad with 0. Returns (matrix [n, L], lens [n])."""
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    lens = np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-max_len:]
        out[i, : len(r)] = r
        lens[i] = len(r)
    return out, lens


# --------------------------------------------------------------------------- training examples


@dataclass
class Examples:
    seq: np.ndarray  # [M, L]
    lens: np.ndarray  # [M]
    users: np.ndarray  # [M]
    targets: np.ndarray  # [M, L]: item to predict after each position, 0 = none
    target_pos: np.ndarray  # [M, L]: index t in the user's item_ids of that target (-1 = none)
    # [M, L] bool: may this position's user vector fuse the user's rationale? None: no rationales.
    rationale_mask: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.lens)


def rationale_mask(target_pos: np.ndarray, users: np.ndarray, cuts: np.ndarray, protocol: str) -> np.ndarray:
    """[M, L] bool. ``consistent``: a position may fuse its user's rationale only when the rationale
    was written from a prefix no longer than the target's history (``cut <= t``). ``leaky``: every
    position fuses it (the rationale may have read the target). ``cuts`` [n_users + 1]: the
    ``prefix_len`` of each user's rationale (0 for users without one: they fuse their fallback)."""
    if protocol == "leaky":
        return np.ones(target_pos.shape, dtype=bool)
    if protocol != "consistent":
        raise ValueError(f"rationale protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    return target_pos >= cuts[users][:, None]


def _examples(seqs, tgts, pos, users, max_len: int, cuts: Optional[np.ndarray], protocol: str) -> Examples:
    seq, lens = pad_right(seqs, max_len)
    tgt, _ = pad_right(tgts, max_len)
    tpos, _ = pad_right([p + 1 for p in pos], max_len)  # shifted by one so padding reads -1 below
    users = np.asarray(users, dtype=np.int64)
    ex = Examples(seq, lens, users, tgt, tpos - 1)
    if cuts is not None:
        ex.rationale_mask = rationale_mask(ex.target_pos, users, cuts, protocol)
    return ex


def window_examples(data: RecData, max_len: int, cuts: Optional[np.ndarray] = None,
                    protocol: str = "consistent", stride: Optional[int] = None,
                    jitter: Optional[np.random.Generator] = None) -> Examples:
    """All-position training: each training prefix is cut into windows of ``max_len`` (from the
    end); every position predicts the next item. With ``cuts`` (the rationale prefix_len of each
    user id), ``rationale_mask`` follows ``protocol``.

    ``stride`` < ``max_len`` overlaps the windows: window k ends ``k * stride`` items before the end
    and keeps targets only on its last ``stride`` positions (the window reaching the start keeps them
    all), so every target is predicted once, from at least ``max_len - stride`` earlier items when
    the history has them. Without overlap the first positions of each window start from nothing,
    although the model reads up to ``max_len`` items at test time. None, or a stride of ``max_len``
    or more: windows that do not overlap.

    ``jitter`` (a generator) draws one shift per user in ``[0, stride)`` and moves every window end
    but the last one that many items earlier: a new draw each epoch predicts each target from
    another context, still once per epoch and from at least ``max_len - stride`` earlier items."""
    step = max_len if stride is None else min(int(stride), max_len)
    if step < 1:
        raise ValueError(f"window stride {stride} must be at least 1")
    shifts = jitter.integers(0, step, size=len(data)) if jitter is not None else np.zeros(len(data), np.int64)
    seqs, tgts, pos, users = [], [], [], []
    for u, s, shift in zip(data.user_ids, data.seqs, shifts.tolist()):
        train = splits.training_prefix(s)
        x, y = train[:-1], train[1:]
        ends = ([len(x)] if shift else []) + list(range(len(x) - shift, 0, -step))
        for k, end in enumerate(ends):
            start = max(0, end - max_len)
            # targets up to the next window's end belong to that window
            first = start if start == 0 or k + 1 == len(ends) else max(start, ends[k + 1])
            seqs.append(x[start:end])
            t = np.array(y[start:end], dtype=np.int64)
            t[:first - start] = 0  # 0 = no target at that position
            tgts.append(t)
            p = np.arange(start + 1, end + 1, dtype=np.int64)  # y[i] is train[i + 1]
            p[:first - start] = -1
            pos.append(p)
            users.append(u)
            if start == 0:
                break
    return _examples(seqs, tgts, pos, users, max_len, cuts, protocol)


def prefix_examples(data: RecData, max_len: int, per_user: Optional[int], rng: np.random.Generator,
                    cuts: Optional[np.ndarray] = None, protocol: str = "consistent") -> Examples:
    """Last-position training (SR-GNN): prefixes ``train[:t] -> train[t]``; ``per_user`` random cut
    points per user (all when None). Drawn anew each epoch from ``rng``."""
    seqs, tgts, pos, users = [], [], [], []
    for u, s in zip(data.user_ids, data.seqs):
        train = splits.training_prefix(s)
        cut_points = np.arange(1, len(train))
        if per_user is not None and len(cut_points) > per_user:
            cut_points = np.sort(rng.choice(cut_points, per_user, replace=False))
        for t in cut_points:
            hist = train[max(0, t - max_len):t]
            seqs.append(hist)
            tgts.append(np.r_[np.zeros(len(hist) - 1, np.int64), train[t]])
            pos.append(np.r_[np.full(len(hist) - 1, -1, np.int64), t])
            users.append(u)
    return _examples(seqs, tgts, pos, users, max_len, cuts, protocol)


# --------------------------------------------------------------------------- evaluation inputs


@dataclass
class EvalSplit:
    users: np.ndarray  # [U]
    seq: np.ndarray  # [U, L] input history (right-padded)
    lens: np.ndarray  # [U]
    targets: np.ndarray  # [U]
    excl_rows: np.ndarray  # history items to exclude from full ranking (never the target)
    excl_cols: np.ndarray
    n_candidates: np.ndarray  # [U] items a full ranking ranks the target among (incl. the target)


def eval_split(data: RecData, split: str, max_len: int) -> EvalSplit:
    """``valid``: history s[:-2] -> s[-2]; ``test``: history s[:-1] -> s[-1]."""
    pairs = [splits.split_history(s, split) for s in data.seqs]
    hist = [h for h, _ in pairs]
    targets = np.array([t for _, t in pairs], dtype=np.int64)
    seq, lens = pad_right(hist, max_len)
    rows, cols, n_cand = [], [], []
    for i, (h, t) in enumerate(zip(hist, targets)):
        ex = np.unique(h)
        ex = ex[ex != t]
        rows.append(np.full(len(ex), i, dtype=np.int64))
        cols.append(ex)
        n_cand.append(data.n_items - len(ex))
    return EvalSplit(
        data.user_ids, seq, lens, targets,
        np.concatenate(rows) if rows else np.zeros(0, np.int64),
        np.concatenate(cols) if cols else np.zeros(0, np.int64),
        np.asarray(n_cand, dtype=np.int64),
    )


# --------------------------------------------------------------------------- text vectors


def read_vectors(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], vectors float32 [n, D]) of an ``embeddings`` folder (any Parquet parts in it)."""
    if not storage.exists(folder):
        raise FileNotFoundError(f"{folder}: no embeddings (run `slim-ray encode` first)")
    files = storage.parquet_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no embeddings parts (run `slim-ray encode` first)")
    tables = []
    for f in files:
        t = storage.read_parquet_file(f)
        for col in ("id", "vector"):
            if col not in t.column_names:
                raise ValueError(f"{f}: missing column '{col}' (embeddings contract: id, kind, encoder, vector)")
        tables.append(t.select(["id", "vector"]))
    t = pa.concat_tables(tables)
    vtype = t.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype):
        raise ValueError(f"{folder}: column 'vector' is {vtype}, expected fixed_size_list<float32>")
    ids = t.column("id").to_numpy()
    flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vecs = np.asarray(flat, dtype=np.float32).reshape(len(ids), vtype.list_size)
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        raise ValueError(f"{folder}: duplicate ids, e.g. {ids[np.setdiff1d(np.arange(len(ids)), first)][:5].tolist()}")
    return ids.astype(np.int64), vecs


def item_text_table(folder: str, n_items: int) -> np.ndarray:
    """[n_items + 1, D] item text vectors (row 0 zeros); every item must have one."""
    ids, vecs = read_vectors(folder)
    table = np.zeros((n_items + 1, vecs.shape[1]), dtype=np.float32)
    ok = (ids >= 1) & (ids <= n_items)
    table[ids[ok]] = vecs[ok]
    have = np.zeros(n_items + 1, dtype=bool)
    have[ids[ok]] = True
    missing = np.flatnonzero(~have[1:]) + 1
    if len(missing):
        raise ValueError(f"{folder}: {len(missing)} of {n_items} items have no text vector, "
                         f"first item_ids {missing[:5].tolist()}")
    return table


class MissingRationales(ValueError):
    @classmethod
    def of(cls, folder: str, n_missing: int, n_users: int, first_ids: list[int]) -> "MissingRationales":
        """The error of ``missing_rationale=error``, naming how many users lack a vector and the first ids."""
        return cls(f"{folder}: {n_missing} of {n_users} users have no rationale vector, first user_ids "
                   f"{list(first_ids)[:5]}; set rec.missing_rationale=learned (or zeros) to fall back for them")


def cut_past_prefix(rationales: str, n_bad: int, first_ids: list[int]) -> ValueError:
    """The error of rationales written past their users' training prefix (they read a held-out target)."""
    return ValueError(f"{rationales}: {n_bad} users have a rationale written past their training prefix "
                      f"(prefix_len > len(item_ids) - 2), first user_ids {list(first_ids)[:5]}")


def user_text_table(folder: str, users: np.ndarray, n_users: int, policy: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """([n_users + 1, D] rationale vectors, has [n_users + 1] bool, ids of users falling back).

    policy ``error``: raise naming how many users lack a vector and the first ids."""
    ids, vecs = read_vectors(folder)
    table = np.zeros((n_users + 1, vecs.shape[1]), dtype=np.float32)
    has = np.zeros(n_users + 1, dtype=bool)
    ok = (ids >= 1) & (ids <= n_users)
    table[ids[ok]] = vecs[ok]
    has[ids[ok]] = True
    missing = [int(u) for u in users if not has[u]]
    if missing and policy == "error":
        raise MissingRationales.of(folder, len(missing), len(users), missing)
    return table, has, missing


def rationale_cuts(rationales: str, data: RecData) -> np.ndarray:
    """[n_users + 1] int64: the cut ``c`` (``prefix_len``) of the rationale each user's vector was
    encoded from (0 for users without one).

    The embeddings contract carries no prefix_len, so it is joined by user_id from the rationales
    folder, choosing the row the encoder embeds: usable (no error, non-empty text), longest prefix,
    then smallest rationale_key. A cut beyond the training prefix (``c > len(item_ids) - 2``) would
    let the rationale read the validation or test target: an error naming the users."""
    if not storage.exists(rationales):
        raise FileNotFoundError(
            f"{rationales}: no rationales, needed for their prefix_len under rec.rationale_protocol="
            "consistent (run the generation stage, or set rec.rationale_protocol=leaky)")
    t = _read_contract(rationales, RATIONALES_SCHEMA, ["user_id", "prefix_len", "rationale_key", "text", "error"])
    ok = pc.and_(pc.is_null(t.column("error")), pc.invert(pc.is_null(t.column("text"))))
    t = t.filter(ok)
    t = t.filter(pc.not_equal(pc.utf8_trim_whitespace(t.column("text")), ""))
    t = t.sort_by([("user_id", "ascending"), ("prefix_len", "descending"), ("rationale_key", "ascending")])
    users = t.column("user_id").to_numpy()
    plen = t.column("prefix_len").to_numpy()
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    users, plen = users[first], plen[first]
    cuts = np.zeros(data.n_users + 1, dtype=np.int64)
    ok = (users >= 1) & (users <= data.n_users)
    cuts[users[ok]] = plen[ok]
    train_len = np.zeros(data.n_users + 1, dtype=np.int64)
    train_len[data.user_ids] = [splits.training_length(len(s)) for s in data.seqs]
    bad = np.flatnonzero((cuts > train_len) & (train_len > 0))
    if len(bad):
        raise cut_past_prefix(rationales, len(bad), bad.tolist())
    return cuts


# --------------------------------------------------------------------------- sequence shards


def sequence_row_groups(path: str) -> list[tuple[str, list[int]]]:
    """[(part uri, rows of each row group)] of the ``sequences`` contract, from the Parquet footers
    only (no rows read): what a sharded reader splits into shards."""
    import pyarrow.parquet as pq

    out = []
    for f in storage.parquet_files(path):
        fs, p = storage.resolve(f)
        md = pq.ParquetFile(p, filesystem=fs).metadata
        out.append((f, [md.row_group(i).num_rows for i in range(md.num_row_groups)]))
    if not out:
        raise FileNotFoundError(f"{path}: no Parquet files")
    return out


def load_sequence_shard(part: str, row_groups: list[int], n_items: Optional[int] = None) -> RecData:
    """The users (>= 3 items) of some row groups of one sequences part, sorted by user_id, checked as
    ``load_sequences`` checks the whole contract. May hold no user (``n_users`` 0 then)."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(part)
    t = pq.ParquetFile(p, filesystem=fs).read_row_groups(row_groups, columns=["user_id", "item_ids"])
    check_columns(t, pa.schema([SEQUENCES_SCHEMA.field(c) for c in ("user_id", "item_ids")]), part)
    users, seqs = _users_with_sequences(t)
    return _checked(part, users, seqs, n_items)
