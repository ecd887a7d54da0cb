"""Raw inputs and contracts on a storage URI (fsspec's in-process ``memory://`` filesystem, which
``slim_ray.storage`` opens through pyarrow like any remote scheme): the same rows as local files."""

from __future__ import annotations

import gzip
import uuid

import pyarrow as pa
import pytest

from slim_ray import storage
from slim_ray.data.config import PrepareConfig
from slim_ray.data.io import read_items, read_sequences, write_table
from slim_ray.data.readers import BadInputError, build_specs, expand_paths, plan_pieces, read_local
from slim_ray.data.schemas import SEQUENCES_SCHEMA

INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         + "".join(f"{u}\t{i}\t{1 + (u + i) % 5}\t{1000 + u * 10 + i}\n" for u in range(1, 9) for i in range(1, 6)))
REVIEWS = "".join(f'{{"reviewerID": "u{u}", "asin": "a{i}", "unixReviewTime": {100 + i}, "overall": 5}}\n'
                  for u in range(4) for i in range(3))


@pytest.fixture()
def root():
    # memory:///name: fsspec keeps a leading "/" on memory paths, so the URI carries it too
    return f"memory:///slim-test-{uuid.uuid4().hex[:8]}"


def _specs(**kw):
    cfg = PrepareConfig(**kw)
    return build_specs(cfg, expand_paths(cfg.interactions, "interaction"), [])[0]


def test_raw_inputs_on_a_uri_read_like_local_files(root, tmp_path):
    local = tmp_path / "x.inter"
    local.write_text(INTER)
    storage.write_text(storage.join(root, "raw", "x.inter"), INTER)
    uri_spec = _specs(source="atomic", interactions=storage.join(root, "raw"), chunk_mb=1)
    assert uri_spec.files == [storage.join(root, "raw", "x.inter")]
    # byte-range pieces (seek + readline through the pyarrow file) give the same rows
    uri_spec.chunk_bytes = 97
    assert len(plan_pieces(uri_spec)) > 5
    a, skipped, _ = read_local(uri_spec)
    local_spec = _specs(source="atomic", interactions=str(local))
    local_spec.chunk_bytes = 97
    b, _, _ = read_local(local_spec)
    assert skipped == 0 and a.num_rows == 40
    assert a.to_pydict() == b.to_pydict()

    # .gz Amazon JSON lines and a glob in the last part
    fs, path = storage.resolve(storage.join(root, "raw", "reviews-1.json.gz"))
    with fs.open_output_stream(path, compression=None) as f:  # the bytes as given, already gzip
        f.write(gzip.compress(REVIEWS.encode()))
    spec = _specs(source="amazon", interactions=storage.join(root, "raw", "reviews-*.json.gz"))
    t, _, _ = read_local(spec)
    assert t.num_rows == 12 and sorted(set(t.column("user_key").to_pylist())) == ["u0", "u1", "u2", "u3"]
    with pytest.raises(BadInputError, match="no interaction files found"):
        _specs(source="amazon", interactions=storage.join(root, "raw", "nothing-*.json"))
    with pytest.raises(BadInputError, match="does not exist"):
        _specs(source="atomic", interactions=storage.join(root, "raw", "missing.inter"))


def test_contract_readers_on_a_uri_check_columns_and_name_the_path(root):
    seqs = pa.Table.from_pylist([{"user_id": 1, "user_key": "u1", "item_ids": [1, 2, 3], "timestamps": [1, 2, 3]}],
                                schema=SEQUENCES_SCHEMA)
    folder = storage.join(root, "run", "prepared", "sequences")
    write_table(seqs, storage.join(folder, "part-0.parquet"))
    write_table(seqs, storage.join(folder, "part-1.parquet"))
    assert read_sequences(folder).num_rows == 2
    assert read_sequences(folder, columns=["user_id"]).column_names == ["user_id"]
    items = storage.join(root, "run", "prepared", "items")
    write_table(pa.table({"item_id": [1]}), storage.join(items, "part-0.parquet"))
    with pytest.raises(ValueError, match=f"{items}: missing column 'item_key'"):
        read_items(items)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_items(storage.join(root, "nope"))
