"""Per-user state of a run: every known user's history, stored rationale vector and rationale text
in flat NumPy files that recommender replicas and training workers memory-map, instead of Python dicts.

A state folder (``state_uri``: ``<run_dir>/serve/userstate/<role>[-novectors]-<source key>/``):

    user_ids.npy            int64   [U]       sorted, unique: lookup is ``np.searchsorted``
    history_offsets.npy     int64   [U + 1]   user i's history is history_items[off[i]:off[i + 1]]
    history_items.npy       int64   [H]       item ids, oldest first (the sequences contract)
    vectors.npy             float32 [U, d]    rationale vector of user i (a zero row where none;
                                              d = 0 when the run has no vectors for the role)
    has_vector.npy          bool    [U]
    rationale_offsets.npy   int64   [U + 1]   user i's rationale text: UTF-8 bytes
    rationale_bytes.npy     uint8   [T]       rationale_bytes[off[i]:off[i + 1]] (empty: none)
    rationale_prefix_len.npy int64  [U]       prefix_len of that rationale (0: none); recommender
                                              training reads it as the rationale's cut
    state.json              format, counts, every file's dtype, shape and size; written last

Sources are the run's contracts, read through ``slim_ray.storage``: ``prepared/sequences``
(user_id, item_ids), ``embeddings/<role>`` (kind=user; parts of a minority vector width are left
out, as ``encode.store.read_parts`` does) and ``rationales/<role>`` (per user, a row without error
and with a non-empty text, the longest ``prefix_len``; among equals, the later row). Users are
those of the sequences; vectors and texts of other users are dropped (they were never served).

Who reads it: every recommender replica (``slim_ray.serve``), and recommender training under
``rec.ingest=dataset`` (``slim_ray.rec.ingest``), so it lives below both, with the data contracts.
Where it is built: in the serve start-up path or the training set-up, never in the driver. ``slim-ray serve``
(``slim_ray.serve.app.start``) runs ``ensure_published`` as one Ray task before it deploys the
graph; every recommender replica then calls ``ensure``, which builds only when the state is still
missing (a graph started another way, e.g. a RayService, or data changed since). The folder name
carries a hash of the sources' file listings, so new data gives a new state. A build goes part by
part: each Parquet part is read,
its columns appended to local scratch files, then the users are sorted and the files written in
chunks of users, so memory holds NumPy arrays of one entry per user (ids, offsets) and one part,
never a Python list or dict of users. Replicas on one node take a file lock, so one builds and
the others open what it published. Publishing is atomic: on a local run folder the state is
built in a hidden sibling folder and renamed into place (a published folder is never written
again); on an object store it is uploaded with ``storage.upload_dir``, whose ``_content.json`` is
written last and is the commit marker. Each node fetches it once into its local cache
(``storage.local_copy``, keyed by content) and every replica maps it (``np.load(mmap_mode="r")``):
the pages are shared through the page cache, and only the rows a request touches are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray import storage

FORMAT = 2
MANIFEST = "state.json"
#: file name -> dtype; the shapes are in state.json
FILES = {
    "user_ids": np.int64,
    "history_offsets": np.int64,
    "history_items": np.int64,
    "vectors": np.float32,
    "has_vector": np.bool_,
    "rationale_offsets": np.int64,
    "rationale_bytes": np.uint8,
    "rationale_prefix_len": np.int64,
}
#: users gathered per write while reordering (bounds the memory of one step)
CHUNK_USERS = 65536


class UserStateError(ValueError):
    """A state folder that is incomplete or damaged; the message starts with the file at fault."""


# ----------------------------------------------------------------------------- lookups


class _View(Mapping):
    """A read-only mapping user_id -> value over the memory-mapped arrays (no dict behind it)."""

    def __init__(self, state: "UserState", get, mask=None):
        """``mask()``: which users have a value (None: all); computed only when iterated."""
        self._state, self._get, self._mask = state, get, mask

    def __getitem__(self, user_id):
        value = self._get(user_id)
        if value is None:
            raise KeyError(user_id)
        return value

    def __iter__(self) -> Iterator[int]:
        ids = self._state.user_ids if self._mask is None else self._state.user_ids[self._mask()]
        return (int(u) for u in ids)

    def __len__(self) -> int:
        return len(self._state.user_ids) if self._mask is None else int(np.count_nonzero(self._mask()))


class UserState:
    """The memory-mapped state of one folder (see module doc). Lookups return None for a user the
    run does not know, or who has no vector / rationale."""

    def __init__(self, arrays: dict[str, np.ndarray], folder: Optional[str] = None, meta: Optional[dict] = None):
        self.folder, self.meta = folder, meta or {}
        self.user_ids = arrays["user_ids"]
        self.history_offsets, self.history_items = arrays["history_offsets"], arrays["history_items"]
        self.vectors, self.has_vector = arrays["vectors"], arrays["has_vector"]
        self.rationale_offsets, self.rationale_bytes = arrays["rationale_offsets"], arrays["rationale_bytes"]
        self.rationale_prefix_len = arrays.get("rationale_prefix_len", np.zeros(len(self.user_ids), np.int64))
        # plain ndarray views of the same mapped pages: slicing a np.memmap costs more per lookup
        self._ids, self._hoff, self._hitems = (a.view(np.ndarray) for a in (
            self.user_ids, self.history_offsets, self.history_items))
        self._vecs, self._has = self.vectors.view(np.ndarray), self.has_vector.view(np.ndarray)
        self._roff, self._rbytes = self.rationale_offsets.view(np.ndarray), self.rationale_bytes.view(np.ndarray)
        #: mappings for code that reads ``catalog.histories[u]`` and the like
        self.histories = _View(self, self.history)
        self.user_vectors = _View(self, self.vector, lambda: self._has)
        self.rationales = _View(self, self.rationale, lambda: np.diff(self._roff) > 0)

    @classmethod
    def empty(cls, dim: int = 0) -> "UserState":
        z = np.zeros(0, np.int64)
        return cls({"user_ids": z, "history_offsets": np.zeros(1, np.int64), "history_items": z,
                    "vectors": np.zeros((0, dim), np.float32), "has_vector": np.zeros(0, bool),
                    "rationale_offsets": np.zeros(1, np.int64), "rationale_bytes": np.zeros(0, np.uint8),
                    "rationale_prefix_len": z})

    @classmethod
    def open(cls, folder: str) -> "UserState":
        """Map a local state folder read-only. UserStateError naming the file when a file is
        missing, truncated, of the wrong dtype or shape, or its offsets do not add up."""
        manifest = os.path.join(folder, MANIFEST)
        if not os.path.isfile(manifest):
            raise UserStateError(f"{manifest}: missing (an incomplete user state folder; it is written last)")
        try:
            with open(manifest) as f:
                meta = json.load(f)
            specs = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserStateError(f"{manifest}: unreadable ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise UserStateError(f"{manifest}: format {meta.get('format')!r}, this code reads format {FORMAT}")
        arrays = {}
        for name, dtype in FILES.items():
            path = os.path.join(folder, f"{name}.npy")
            spec = specs.get(name) or {}
            if not os.path.isfile(path):
                raise UserStateError(f"{path}: missing from the user state folder")
            size = os.path.getsize(path)
            if size != spec.get("bytes"):
                raise UserStateError(f"{path}: {size} bytes, {MANIFEST} says {spec.get('bytes')} "
                                     "(truncated or damaged)")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserStateError(f"{path}: unreadable ({e})") from None
            if arr.dtype != np.dtype(dtype) or list(arr.shape) != list(spec.get("shape", [])):
                raise UserStateError(f"{path}: {arr.dtype} {list(arr.shape)}, expected {np.dtype(dtype)} "
                                     f"{spec.get('shape')}")
            arrays[name] = arr
        n = len(arrays["user_ids"])
        for offsets, values in (("history_offsets", "history_items"), ("rationale_offsets", "rationale_bytes")):
            off = arrays[offsets]
            if len(off) != n + 1 or off[0] != 0 or off[-1] != len(arrays[values]):
                raise UserStateError(f"{os.path.join(folder, offsets + '.npy')}: offsets do not match "
                                     f"{values}.npy ({len(arrays[values])} values, {n} users)")
        if len(arrays["rationale_prefix_len"]) != n:
            raise UserStateError(f"{os.path.join(folder, 'rationale_prefix_len.npy')}: "
                                 f"{len(arrays['rationale_prefix_len'])} rows for {n} users")
        if arrays["vectors"].shape[0] != n or len(arrays["has_vector"]) != n:
            raise UserStateError(f"{os.path.join(folder, 'vectors.npy')}: {arrays['vectors'].shape[0]} rows for {n} users")
        return cls(arrays, folder, meta)

    def __len__(self) -> int:
        return len(self.user_ids)

    def index(self, user_id) -> int:
        """Row of ``user_id``, -1 when the run does not know it."""
        ids = self._ids
        if user_id is None or not len(ids) or not -2**63 <= user_id < 2**63:
            return -1
        i = int(ids.searchsorted(user_id))
        return i if i < len(ids) and ids[i] == user_id else -1

    def __contains__(self, user_id) -> bool:
        return self.index(user_id) >= 0

    def history(self, user_id) -> Optional[list[int]]:
        i = self.index(user_id)
        if i < 0:
            return None
        return self._hitems[self._hoff[i]:self._hoff[i + 1]].tolist()

    def vector(self, user_id) -> Optional[np.ndarray]:
        i = self.index(user_id)
        if i < 0 or not self._has[i]:
            return None
        return self._vecs[i].copy()  # a copy: the caller may keep it

    def rationale(self, user_id) -> Optional[str]:
        i = self.index(user_id)
        if i < 0:
            return None
        a, b = self._roff[i], self._roff[i + 1]
        return self._rbytes[a:b].tobytes().decode("utf-8") if b > a else None


# ----------------------------------------------------------------------------- where, and when to build


def sources(layout, role: str, vectors: bool = True) -> dict[str, Optional[str]]:
    """The contracts a state is built from (None: not used)."""
    return {"sequences": layout.sequences,
            "embeddings": layout.user_embeddings(role) if role != "none" and vectors else None,
            "rationales": layout.rationales(role) if role != "none" else None}


def source_key(srcs: dict[str, Optional[str]]) -> str:
    """A hash of the sources' file listings (names, sizes, mtimes): new data, a new state."""
    basis = {"format": FORMAT, **{k: storage.tree_listing(v) if v else None for k, v in srcs.items()}}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=list).encode()).hexdigest()[:16]


def state_uri(layout, role: str, vectors: bool = True, srcs: Optional[dict[str, Optional[str]]] = None) -> str:
    srcs = srcs or sources(layout, role, vectors)
    name = f"{role}{'' if vectors else '-novectors'}-{source_key(srcs)}"
    return storage.join(layout.root, "serve", "userstate", name)


def is_published(uri: str) -> bool:
    """Local: the folder was renamed into place whole. Object store: its content index, uploaded last."""
    marker = MANIFEST if storage.is_local(uri) else storage.CONTENT_INDEX
    return storage.is_file(storage.join(uri, marker))


def ensure(layout, role: str, vectors: bool = True, cache_dir: Optional[str] = None) -> UserState:
    """The run's state for ``role`` (``none``: histories only; ``vectors=False``: no vectors, for a
    scorer that keeps its own), built and published when missing, fetched into this node's cache
    and memory-mapped."""
    uri = ensure_published(layout.root, role, vectors, cache_dir)
    return UserState.open(storage.local_copy(uri, cache_dir))


def ensure_published(run_dir: str, role: str, vectors: bool = True, cache_dir: Optional[str] = None,
                     rationales_role: Optional[str] = None) -> str:
    """Build and publish the state when the run has none for its current sources; returns its
    URI. Plain arguments, so that it can run as a Ray task (``slim_ray.serve.app.start`` does,
    before the replicas start). ``rationales_role``: read the rationale texts and their prefix_len
    from that role's folder (a per-step ablation role such as ``student-step1`` has vectors of its
    own but the rationales of ``student``)."""
    from slim_ray.layout import RunLayout

    layout = RunLayout(run_dir)
    srcs = sources(layout, role, vectors)
    if rationales_role is not None:
        srcs["rationales"] = layout.rationales(rationales_role)
    uri = state_uri(layout, role, vectors, srcs)
    if not is_published(uri):
        with _node_lock(storage.basename(uri), cache_dir):
            if not is_published(uri):
                publish(uri, srcs)
    return uri


@contextlib.contextmanager
def _node_lock(name: str, cache_dir: Optional[str]):
    """One builder per node and state (the other replicas wait, then open what it published)."""
    import fcntl

    from slim_ray.assets import cache_dir as slim_ray_cache

    folder = os.path.join(str(slim_ray_cache(cache_dir)), "locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"userstate-{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(uri: str, srcs: dict[str, Optional[str]]) -> None:
    """Build the state of ``srcs`` and publish it at ``uri`` (see module doc)."""
    if storage.is_local(uri):
        final = storage.normalize(uri)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(final))
        try:
            build(tmp, **srcs)
            try:
                os.rename(tmp, final)  # atomic; fails when another builder published first
            except OSError:
                if not is_published(uri):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    from slim_ray.assets import cache_dir as slim_ray_cache

    tmp = tempfile.mkdtemp(prefix=".userstate-", dir=str(slim_ray_cache()))
    try:
        build(tmp, **srcs)
        storage.upload_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- building


def build(folder: str, sequences: str, embeddings: Optional[str] = None, rationales: Optional[str] = None) -> dict:
    """Write the state of these contracts (paths or URIs) into the local ``folder``, part by
    part; ``state.json`` last. Returns its content."""
    os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".scratch-", dir=folder)
    try:
        user_ids, n_items = _write_histories(folder, scratch, sequences)
        dim, n_vec = _write_vectors(folder, user_ids, embeddings)
        n_text = _write_rationales(folder, scratch, user_ids, rationales)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return write_manifest(folder, {"sequences": sequences, "embeddings": embeddings, "rationales": rationales},
                          users=len(user_ids), history_items=n_items, dim=dim, users_with_vector=n_vec,
                          users_with_rationale=n_text)


def write_manifest(folder: str, srcs: Optional[dict] = None, **counts) -> dict:
    """``state.json`` of the ``.npy`` files in ``folder`` (dtype, shape, size of each), written
    after them: a folder without it is incomplete. Returns its content."""
    files = {}
    for name in FILES:
        path = os.path.join(folder, f"{name}.npy")
        arr = np.load(path, mmap_mode="r")
        files[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "bytes": os.path.getsize(path)}
        del arr
    meta = {"format": FORMAT, **counts, "sources": srcs or {}, "files": files}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def _parts(uri: Optional[str]) -> list[str]:
    return storage.parquet_files(uri) if uri and storage.exists(uri) else []


def _raw(path: str, dtype) -> np.ndarray:
    """A scratch file as an array (np.memmap cannot map an empty file)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _gather(src: np.ndarray, src_off: np.ndarray, order: np.ndarray, out_off: np.ndarray, out: np.ndarray) -> None:
    """out[out_off[j]:out_off[j+1]] = src[src_off[order[j]] : + its length], CHUNK_USERS users at a time."""
    lens = np.diff(out_off)
    for a in range(0, len(order), CHUNK_USERS):
        b = min(a + CHUNK_USERS, len(order))
        lo, hi = int(out_off[a]), int(out_off[b])
        if hi == lo:
            continue
        starts = src_off[order[a:b]] - (out_off[a:b] - lo)
        out[lo:hi] = src[np.repeat(starts, lens[a:b]) + np.arange(hi - lo)]


def _offsets(lens: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    return off


def _write_histories(folder: str, scratch: str, sequences: str) -> tuple[np.ndarray, int]:
    """user_ids, history_offsets, history_items; returns (sorted user ids, items written)."""
    paths = {k: os.path.join(scratch, k) for k in ("ids", "lens", "items")}
    with open(paths["ids"], "wb") as f_ids, open(paths["lens"], "wb") as f_lens, open(paths["items"], "wb") as f_items:
        for part in _parts(sequences):
            table = storage.read_parquet_file(part, columns=["user_id", "item_ids"])
            for batch in table.to_batches():
                lists = batch.column(1)
                np.asarray(batch.column(0).to_numpy(), np.int64).tofile(f_ids)
                np.asarray(pc.list_value_length(lists).fill_null(0).to_numpy(), np.int64).tofile(f_lens)
                np.asarray(lists.flatten().to_numpy(zero_copy_only=False), np.int64).tofile(f_items)
            del table
    ids, lens = np.fromfile(paths["ids"], np.int64), np.fromfile(paths["lens"], np.int64)
    order = np.argsort(ids, kind="stable")
    user_ids = ids[order]
    dup = user_ids[1:][np.diff(user_ids) == 0]
    if len(dup):
        raise ValueError(f"{sequences}: duplicate user_ids {dup[:5].tolist()} (one row per user expected)")
    out_off = _offsets(lens[order])
    items = np.lib.format.open_memmap(os.path.join(folder, "history_items.npy"), "w+", np.int64, (int(out_off[-1]),))
    _gather(_raw(paths["items"], np.int64), _offsets(lens), order, out_off, items)
    items.flush()
    del items
    np.save(os.path.join(folder, "user_ids.npy"), user_ids)
    np.save(os.path.join(folder, "history_offsets.npy"), out_off)
    return user_ids, int(out_off[-1])


def _positions(user_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each id in user_ids, mask of the ids that are there)."""
    if not len(user_ids):
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(user_ids, ids), len(user_ids) - 1)
    return pos, user_ids[pos] == ids


def _write_vectors(folder: str, user_ids: np.ndarray, embeddings: Optional[str]) -> tuple[int, int]:
    """vectors, has_vector from the kind=user rows; returns (width, users with a vector)."""
    parts, widths, rows = [], [], {}
    if embeddings and storage.is_dir(embeddings):
        parts = storage.list_files(embeddings, suffix=".parquet")
    for part in parts:
        schema = storage.parquet_schema(part)
        for col in ("id", "kind", "vector"):
            if schema.get_field_index(col) < 0:
                raise ValueError(f"{part}: missing column '{col}' (not an embeddings part written by the encode stage)")
        width = schema.field("vector").type.list_size
        widths.append(width)
        rows[width] = rows.get(width, 0) + storage.read_parquet_file(part, columns=["id"]).num_rows
    dim = max(rows, key=lambda w: (rows[w], w)) if rows else 0  # an encoder change: keep the majority's width
    vectors = np.lib.format.open_memmap(os.path.join(folder, "vectors.npy"), "w+", np.float32, (len(user_ids), dim))
    has = np.zeros(len(user_ids), bool)
    for part, width in zip(parts, widths):
        if width != dim:
            continue
        t = storage.read_parquet_file(part, columns=["id", "kind", "vector"])
        t = t.filter(pc.equal(t.column("kind"), "user"))
        if not t.num_rows:
            continue
        ids = t.column("id").to_numpy()
        pos, known = _positions(user_ids, ids)
        rows_here = pos[known]
        if len(np.unique(rows_here)) < len(rows_here) or has[rows_here].any():
            twice = np.bincount(rows_here, minlength=len(user_ids)) + has > 1
            raise ValueError(f"{embeddings}: duplicate ids {user_ids[twice][:5].tolist()}")
        flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vecs = np.asarray(flat, np.float32).reshape(-1, dim)
        vectors[rows_here] = vecs[known]
        has[rows_here] = True
    vectors.flush()
    del vectors
    np.save(os.path.join(folder, "has_vector.npy"), has)
    return dim, int(has.sum())


def _utf8(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n + 1] starting at 0, UTF-8 bytes) of a string array without nulls."""
    arr = arr.cast(pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    _, off_buf, data_buf = arr.buffers()
    off = np.frombuffer(off_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return off - off[0], data[off[0]:off[-1]]


def _write_rationales(folder: str, scratch: str, user_ids: np.ndarray, rationales: Optional[str]) -> int:
    """rationale_offsets, rationale_bytes, rationale_prefix_len: per user the usable row with the
    longest prefix_len, the later row among equals; returns the users with a text."""
    n = len(user_ids)
    best_len = np.full(n, -1, np.int64)  # prefix_len of the chosen row
    src_off, src_len = np.zeros(n, np.int64), np.zeros(n, np.int64)  # its text in the scratch file
    raw_path, written = os.path.join(scratch, "texts"), 0
    with open(raw_path, "wb") as raw:
        for part in _parts(rationales):
            t = storage.read_parquet_file(part, columns=["user_id", "prefix_len", "text", "error"])
            text = t.column("text")
            ok = pc.and_(pc.is_null(t.column("error")), pc.fill_null(pc.greater(pc.binary_length(text), 0), False))
            t = t.filter(ok)
            if not t.num_rows:
                continue
            pos, known = _positions(user_ids, t.column("user_id").to_numpy())
            plen = t.column("prefix_len").fill_null(0).to_numpy()
            rows = np.flatnonzero(known)
            # per user, the last row of the longest prefix in this part
            rows = rows[np.lexsort((rows, plen[rows], pos[rows]))]
            last = np.ones(len(rows), bool)
            last[:-1] = pos[rows][1:] != pos[rows][:-1]
            rows = rows[last]
            upd = plen[rows] >= best_len[pos[rows]]  # a later part wins a tie, as before
            rows = rows[upd]
            if not len(rows):
                continue
            off, data = _utf8(t.column("text").take(pa.array(rows)))
            data.tofile(raw)
            p = pos[rows]
            best_len[p], src_off[p], src_len[p] = plen[rows], written + off[:-1], np.diff(off)
            written += len(data)
    out_off = _offsets(np.where(best_len >= 0, src_len, 0))
    out = np.lib.format.open_memmap(os.path.join(folder, "rationale_bytes.npy"), "w+", np.uint8, (int(out_off[-1]),))
    _gather(_raw(raw_path, np.uint8), src_off, np.arange(n), out_off, out)
    out.flush()
    del out
    np.save(os.path.join(folder, "rationale_offsets.npy"), out_off)
    np.save(os.path.join(folder, "rationale_prefix_len.npy"), np.maximum(best_len, 0))
    return int((best_len >= 0).sum())
