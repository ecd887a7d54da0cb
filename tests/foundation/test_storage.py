"""The storage layer against a real S3-protocol server on loopback and the local filesystem."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pytest

from slim_ray import storage
from conftest import make_bucket


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("s3_server")
    return make_bucket(f"b-{uuid.uuid4().hex[:8]}") + "/run"


def test_uris_join_and_resolve(s3_server, tmp_path):
    assert storage.join("s3://b/p", "x", "y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.normalize("file://" + str(tmp_path)) == str(tmp_path)
    assert storage.normalize("rel/dir") == os.path.abspath("rel/dir")
    assert storage.is_local("/a") and not storage.is_local("s3://b/a")
    fs, path = storage.resolve("s3://bucket/pre/fix/")
    assert fs.type_name == "s3" and path == "bucket/pre/fix"


def test_parquet_parts_json_and_listing(root):
    t = pa.table({"user_id": pa.array([1, 2, 3], pa.int64()), "text": ["a", "b", "c"]})
    folder = storage.join(root, "rationales", "teacher")
    storage.write_table(t.slice(0, 2), storage.join(folder, "part-0.parquet"))
    storage.write_table(t.slice(2), storage.join(folder, "part-1.parquet"))
    storage.write_bytes(storage.join(folder, ".part-2.parquet.abc.tmp"), b"half")  # a killed writer's
    assert [storage.basename(f) for f in storage.list_files(folder, ".parquet")] == ["part-0.parquet", "part-1.parquet"]
    assert storage.read_table(folder).sort_by("user_id").equals(t)
    assert storage.parquet_schema(folder).names == ["user_id", "text"]
    assert storage.remove_temp_files(folder) == 1
    assert storage.list_files(folder, include_hidden=True) == storage.list_files(folder)
    storage.write_json(storage.join(root, "m.json"), {"status": "complete", "n": 3})
    assert storage.read_json(storage.join(root, "m.json")) == {"status": "complete", "n": 3}
    assert storage.read_json(storage.join(root, "missing.json"), default={}) == {}
    assert storage.read_table(storage.join(root, "nothing")) is None if storage.is_dir(storage.join(root, "nothing")) \
        else pytest.raises(FileNotFoundError, storage.read_table, storage.join(root, "nothing"))
    gz = bytes([0x1F, 0x8B]) + b"not really gzip"  # stored as given, whatever the name says
    storage.write_bytes(storage.join(root, "raw", "x.json.gz"), gz)
    assert storage.read_bytes(storage.join(root, "raw", "x.json.gz")) == gz
    listing = storage.tree_listing(folder)
    assert [x[0] for x in listing] == ["part-0.parquet", "part-1.parquet"] and all(x[1] > 0 for x in listing)
    if not storage.is_local(root):  # nothing of an s3:// run reaches a local folder named after it
        assert not os.path.exists("s3:") and not os.path.exists(os.path.join(os.getcwd(), "s3:"))


def test_model_folder_round_trip_and_node_cache(root, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    dest = storage.join(root, "distill", "merged")
    assert storage.upload_dir(str(src), dest) == 2
    assert sorted(storage.read_json(storage.join(dest, "_content.json"))) == ["config.json", "sub/weights.bin"]
    cache = tmp_path / "cache"
    local = storage.local_copy(dest, cache_dir=str(cache))
    assert open(os.path.join(local, "sub", "weights.bin"), "rb").read() == (src / "sub" / "weights.bin").read_bytes()
    if storage.is_local(root):
        assert local == storage.normalize(dest)  # a local folder is used in place
    else:
        assert local.startswith(str(cache)) and storage.local_copy(dest, cache_dir=str(cache)) == local
        (src / "config.json").write_text('{"a": 2}')  # new content -> a new cache entry
        storage.upload_dir(str(src), dest)
        assert storage.local_copy(dest, cache_dir=str(cache)) != local


def test_ray_data_reads_and_writes_through_the_filesystem(ray_session, root):
    import ray

    folder = storage.join(root, "embeddings", "items")
    storage.ray_write_parquet(ray.data.range(1000).map_batches(lambda b: {"id": b["id"], "x": b["id"] * 2}), folder)
    assert storage.list_files(folder, ".parquet")
    ds = storage.ray_read_parquet(folder)
    assert ds.count() == 1000 and ds.sum("x") == 2 * sum(range(1000))
