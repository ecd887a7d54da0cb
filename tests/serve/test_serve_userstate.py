"""The memory-mapped per-user state of serving (slim_ray.data.userstate): built part by part from
real Parquet contracts (several parts, users out of order, several rationales per user, an encoder
change), every user read back equal to what the dict-based catalogue read from the same files,
unknown users reported as unknown, the arrays memory-mapped, published once per data version on a
local run folder and on S3, and a damaged folder named in the error."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from slim_ray import storage
from slim_ray.data.schemas import RATIONALES_SCHEMA, SEQUENCES_SCHEMA
from slim_ray.encode import store
from slim_ray.layout import RunLayout
from slim_ray.data import userstate
from slim_ray.data.userstate import UserState, UserStateError

D = 8
# three parts of sequences, users out of order; user 8 has an empty history
SEQ_PARTS = [{5: [3, 1, 4], 1: [1, 5, 9, 2, 6]}, {9: [5, 3], 3: [5, 8, 9, 7, 9, 3], 8: []}, {2: [2, 7], 7: [1]}]


def _rationale_rows(rows):
    cols = {c: [] for c in RATIONALES_SCHEMA.names}
    for n, (user, plen, text, err) in enumerate(rows):
        row = dict.fromkeys(RATIONALES_SCHEMA.names)
        row.update(rationale_key=f"k{user}-{plen}-{n}-{text}", user_id=user, role="student", prefix_len=plen,
                   text=text, error=err)
        for c in cols:
            cols[c].append(row[c])
    return pa.Table.from_pydict(cols, schema=RATIONALES_SCHEMA)


RATIONALE_PARTS = [
    # user 1: the longest prefix, the later of two equal ones; user 3: an error row is skipped;
    # user 5: an empty text is no rationale; user 7: the later part wins a tie; 42: not a user
    [(1, 2, "a short one", None), (1, 3, "first of the longest", None), (1, 3, "caf\u00e9 \u2713 longest, later", None),
     (3, 9, "failed", "timeout"), (3, 1, "fine", None), (5, 2, "", None), (7, 2, "x", None), (42, 1, "nobody", None)],
    [(7, 2, "y wins the tie", None), (2, None, "no prefix_len", None), (1, 1, "shorter, later", None)],
]


def _vectors(ids, seed):
    return np.random.default_rng(seed).standard_normal((len(ids), D)).astype(np.float32)


def _embedding_part(ids, kind, vecs, folder):
    store.write_part(pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array([kind] * len(ids)), pa.array(["enc"] * len(ids)),
        pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1]),
        pa.array([f"key-{i}-{kind}" for i in ids]),
    ], schema=store.output_schema(vecs.shape[1])), folder)


def write_sources(lay: RunLayout, role: str = "student") -> None:
    """The run's contracts, each in several Parquet parts, written through the storage layer."""
    for n, part in enumerate(SEQ_PARTS):
        users = list(part)
        storage.write_table(pa.Table.from_pydict({
            "user_id": users, "user_key": [f"u{u}" for u in users], "item_ids": [part[u] for u in users],
            "timestamps": [list(range(len(part[u]))) for u in users]}, schema=SEQUENCES_SCHEMA),
            storage.join(lay.sequences, f"part-{n}.parquet"))
    emb = lay.user_embeddings(role)
    _embedding_part([3, 1, 42], "user", _vectors([3, 1, 42], 0), emb)  # 42 is no user of the run
    _embedding_part([7, 9], "user", _vectors([7, 9], 1), emb)
    _embedding_part([11], "item", _vectors([11], 2), emb)  # an item row is no user vector
    _embedding_part([2], "user", np.ones((1, 4), np.float32), emb)  # minority width (old encoder): left out
    for n, rows in enumerate(RATIONALE_PARTS):
        storage.write_table(_rationale_rows(rows), storage.join(lay.rationales(role), f"part-{n}.parquet"))


def dict_catalog(lay: RunLayout, role: str = "student") -> tuple[dict, dict, dict]:
    """What the replicas held before, read from the same files the way they read them: dicts."""
    from slim_ray.encode.store import read_parts

    seq = storage.read_table(lay.sequences, columns=["user_id", "item_ids"])
    histories = dict(zip(seq.column("user_id").to_pylist(), seq.column("item_ids").to_pylist()))
    t = read_parts(lay.user_embeddings(role))
    t = t.filter(pa.compute.equal(t.column("kind"), "user"))
    vecs = np.asarray(t.column("vector").combine_chunks().flatten().to_numpy(), np.float32).reshape(t.num_rows, -1)
    vectors = dict(zip(t.column("id").to_pylist(), vecs))
    rat = storage.read_table(lay.rationales(role), columns=["user_id", "prefix_len", "text", "error"])
    best: dict = {}
    for u, n, text, err in zip(*(rat.column(c).to_pylist() for c in ("user_id", "prefix_len", "text", "error"))):
        if err is None and text and (u not in best or (n or 0) >= best[u][0]):
            best[u] = (n or 0, text)
    return histories, vectors, {u: text for u, (_, text) in best.items()}


@pytest.fixture(scope="module")
def lay(tmp_path_factory):
    lay = RunLayout(str(tmp_path_factory.mktemp("userstate") / "run"))
    write_sources(lay)
    return lay


def test_every_user_reads_back_equal_to_the_source(lay, tmp_path):
    meta = userstate.build(str(tmp_path / "state"), **userstate.sources(lay, "student"))
    st = UserState.open(str(tmp_path / "state"))
    histories, vectors, rationales = dict_catalog(lay)
    assert sorted(histories) == st.user_ids.tolist() == [1, 2, 3, 5, 7, 8, 9] and len(st) == 7
    assert (meta["users"], meta["history_items"], meta["dim"]) == (7, 19, D)
    for u in histories:
        assert u in st and st.history(u) == histories[u]
        if u in vectors:
            np.testing.assert_array_equal(st.vector(u), vectors[u])
        else:
            assert st.vector(u) is None and not st.has_vector[st.index(u)]
        assert st.rationale(u) == rationales.get(u)
    # the rules of the choice, spelled out
    assert st.rationale(1) == "caf\u00e9 \u2713 longest, later" and st.rationale(3) == "fine"
    assert st.rationale(5) is None and st.rationale(7) == "y wins the tie" and st.rationale(2) == "no prefix_len"
    assert st.vector(2) is None  # its only vector has the old encoder's width
    assert st.history(8) == [] and 8 in st
    # the chosen rationale's prefix_len (0: none, or a row without one): training's cut
    assert dict(zip(st.user_ids.tolist(), st.rationale_prefix_len.tolist())) == {1: 3, 2: 0, 3: 1, 5: 0, 7: 2, 8: 0, 9: 0}
    assert (meta["users_with_vector"], meta["users_with_rationale"]) == (4, 4)
    # unknown users: not found, whatever the id
    for u in (0, 4, 6, 10, 11, 42, -1, 2**63 - 1, None):
        assert u not in st and st.history(u) is None and st.vector(u) is None and st.rationale(u) is None
    # the mappings the catalogue exposes read the same arrays
    assert dict(st.histories) == histories
    assert sorted(st.user_vectors) == [1, 3, 7, 9] and sorted(st.rationales) == [1, 2, 3, 7]
    with pytest.raises(KeyError):
        st.histories[42]
    # memory-mapped, not copied: every array is a view of its file
    for name in userstate.FILES:
        arr = getattr(st, name)
        assert isinstance(arr, np.memmap) and arr.filename == str(tmp_path / "state" / f"{name}.npy"), name
    assert not st.vectors.flags.writeable
    with open("/proc/self/maps") as f:
        assert str(tmp_path / "state" / "vectors.npy") in f.read()


def test_small_chunks_and_no_users_give_the_same_answers(lay, tmp_path, monkeypatch):
    """Reordering in chunks of users (as at a million users) gives the state of one chunk."""
    userstate.build(str(tmp_path / "one"), **userstate.sources(lay, "student"))
    monkeypatch.setattr(userstate, "CHUNK_USERS", 2)
    userstate.build(str(tmp_path / "chunks"), **userstate.sources(lay, "student"))
    for name in userstate.FILES:
        a, b = (np.load(tmp_path / d / f"{name}.npy") for d in ("one", "chunks"))
        np.testing.assert_array_equal(a, b, err_msg=name)
    empty = RunLayout(str(tmp_path / "empty"))
    st = userstate.ensure(empty, "student", cache_dir=str(tmp_path / "cache"))
    assert len(st) == 0 and st.history(1) is None and st.vectors.shape == (0, 0)


def test_published_once_per_data_version(lay, tmp_path):
    cache = str(tmp_path / "cache")
    st = userstate.ensure(lay, "student", cache_dir=cache)
    uri = userstate.state_uri(lay, "student")
    assert st.folder == uri and uri.startswith(storage.join(lay.root, "serve", "userstate", "student-"))
    mtime = os.path.getmtime(os.path.join(uri, "vectors.npy"))
    again = userstate.ensure(lay, "student", cache_dir=cache)
    assert again.folder == uri and os.path.getmtime(os.path.join(uri, "vectors.npy")) == mtime  # not rebuilt
    assert os.listdir(os.path.dirname(uri)) == [os.path.basename(uri)]  # no build folder left behind
    # histories only (role none) and no vectors (a checkpoint keeps its own): other states
    bare = userstate.ensure(lay, "none", cache_dir=cache)
    assert bare.vectors.shape == (7, 0) and bare.rationale(1) is None and bare.history(3) == SEQ_PARTS[1][3]
    novec = userstate.ensure(lay, "student", vectors=False, cache_dir=cache)
    assert novec.vector(1) is None and novec.rationale(1) == st.rationale(1)
    # new data (one more rationale part): a new state, the old one untouched
    storage.write_table(_rationale_rows([(9, 1, "new text", None)]), storage.join(lay.rationales("student"), "part-9.parquet"))
    try:
        new = userstate.ensure(lay, "student", cache_dir=cache)
        assert new.folder != uri and new.rationale(9) == "new text" and st.rationale(9) is None
    finally:
        storage.delete_file(storage.join(lay.rationales("student"), "part-9.parquet"))
    assert userstate.state_uri(lay, "student") == uri


def _damage(folder, how):
    if how == "truncated vectors":
        with open(os.path.join(folder, "vectors.npy"), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(folder, "vectors.npy")) - 7)
        return "vectors.npy: .* bytes, state.json says"
    if how == "no manifest":  # a build that stopped before its last file
        os.remove(os.path.join(folder, "state.json"))
        return "state.json: missing"
    if how == "missing file":
        os.remove(os.path.join(folder, "history_items.npy"))
        return "history_items.npy: missing"
    if how == "garbage header":
        with open(os.path.join(folder, "user_ids.npy"), "r+b") as f:
            f.write(b"not numpy")
        return "user_ids.npy: unreadable"
    if how == "bad offsets":
        path = os.path.join(folder, "history_offsets.npy")
        off = np.load(path)
        off[-1] += 1
        np.save(path, off)
        return "history_offsets.npy: offsets do not match"
    if how == "bad manifest":
        with open(os.path.join(folder, "state.json"), "w") as f:
            f.write("{")
        return "state.json: unreadable"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated vectors", "no manifest", "missing file", "garbage header",
                                 "bad offsets", "bad manifest"])
def test_a_damaged_state_names_the_file(lay, tmp_path, how):
    folder = str(tmp_path / "state")
    userstate.build(folder, **userstate.sources(lay, "student"))
    expected = _damage(folder, how)
    with pytest.raises(UserStateError, match=expected) as e:
        UserState.open(folder)
    assert str(e.value).startswith(folder)


def test_state_of_a_run_on_s3_is_fetched_once_into_the_node_cache(lay, s3_server, tmp_path):
    from conftest import make_bucket

    s3 = RunLayout(make_bucket("userstate") + "/run")
    write_sources(s3)
    cache = str(tmp_path / "cache")
    st = userstate.ensure(s3, "student", cache_dir=cache)
    uri = userstate.state_uri(s3, "student")
    assert uri.startswith("s3://userstate/run/serve/userstate/student-")
    assert storage.is_file(storage.join(uri, storage.CONTENT_INDEX))  # the commit marker, uploaded last
    assert st.folder.startswith(os.path.join(cache, "storage"))  # mapped from local disk
    local = UserState.open(userstate.ensure(lay, "student", cache_dir=cache).folder)
    for name in userstate.FILES:
        np.testing.assert_array_equal(getattr(st, name), getattr(local, name), err_msg=name)
    fetched = os.listdir(os.path.join(cache, "storage"))
    assert userstate.ensure(s3, "student", cache_dir=cache).folder == st.folder  # once per node
    assert os.listdir(os.path.join(cache, "storage")) == fetched

