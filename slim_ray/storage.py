"""The one storage layer: every byte a stage reads or writes in a run folder goes through here.

A run folder is a URI: ``/abs/path``, ``relative/path``, ``file:///abs/path``, ``s3://bucket/prefix``,
``gs://bucket/prefix``, or any other scheme ``pyarrow.fs`` or fsspec knows. ``resolve(uri)`` turns it
into a ``pyarrow.fs.FileSystem`` plus a path inside it, once per (scheme, bucket).

Credentials and endpoints come from the standard environment only (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS``
...). Nothing here writes them anywhere.

Publishing:
- a single object (a Parquet part, a JSON manifest) is written under a temporary name and moved into
  place on a local filesystem; on an object store a PUT is already all-or-nothing, so it is written
  under its final name directly (a rename there would be a copy);
- a stage output folder is complete only when its ``manifest.json`` says so: the manifest is the
  commit marker, written last (see ``slim_ray.lineage``).

Model folders (LoRA adapter, merged export, recommender checkpoints) are copied up with
``upload_dir`` and fetched once per node with ``local_copy`` into a local cache keyed by the
content of the folder, so a generation or Serve replica always loads from local disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

#: URI schemes pyarrow opens itself; anything else goes through fsspec.
_ARROW_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
_FS_CACHE: dict[tuple[str, str, str], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- URIs


def scheme(uri: str) -> str:
    """'' for a local path, else the URI scheme ('s3', 'gs', 'file', ...)."""
    s = urlparse(str(uri)).scheme
    return "" if len(s) <= 1 else s  # 'C:' on Windows is a drive, not a scheme


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def normalize(uri: str) -> str:
    """A canonical form: absolute local paths without ``file://``; remote URIs without a trailing /."""
    uri = str(uri)
    if scheme(uri) == "file":
        uri = urlparse(uri).path
    if is_local(uri):
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI (always with '/', never a local ``s3:/`` folder)."""
    uri = str(uri)
    if is_local(uri):
        return os.path.join(uri, *parts)
    out = uri.rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a path or URI."""
    uri = normalize(uri)
    s = scheme(uri)
    if s == "":
        return _cached_fs("", "", pafs.LocalFileSystem), uri
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if s == "s3":
        return _cached_fs(s, parsed.netloc, lambda: _s3_fs(uri)), path
    if s in _ARROW_SCHEMES:
        return _cached_fs(s, parsed.netloc, lambda: pafs.FileSystem.from_uri(uri)[0]), path
    return _cached_fs(s, parsed.netloc, lambda: _fsspec_fs(s)), path


def _s3_fs(uri: str) -> pafs.FileSystem:
    """S3 from the standard environment. With a region given, no call to AWS is made to look the
    bucket's region up (an S3-compatible endpoint such as MinIO or moto has none to give)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and not os.environ.get("AWS_ENDPOINT_URL"):
        return pafs.FileSystem.from_uri(uri)[0]
    return pafs.S3FileSystem(region=region or "us-east-1",
                             endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None)


def _cached_fs(s: str, netloc: str, make) -> pafs.FileSystem:
    # The endpoint is part of the key: a process may point AWS_ENDPOINT_URL elsewhere later.
    key = (s, netloc, os.environ.get("AWS_ENDPOINT_URL", ""))
    with _FS_LOCK:
        if key not in _FS_CACHE:
            _FS_CACHE[key] = make()
        return _FS_CACHE[key]


def _fsspec_fs(s: str) -> pafs.FileSystem:
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(s)))


def _uri_of(uri_root: str, root_path: str, path: str) -> str:
    """The URI of ``path`` (a path inside the filesystem of ``uri_root``)."""
    if is_local(uri_root):
        return path
    rel = path[len(root_path):].lstrip("/")
    return join(uri_root, rel) if rel else normalize(uri_root)


# ----------------------------------------------------------------------------- files and folders


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


def makedirs(uri: str) -> None:
    """Create a folder (a no-op on object stores, where folders exist through their objects)."""
    fs, path = resolve(uri)
    if is_local(uri):
        fs.create_dir(path, recursive=True)


def _files_under(uri: str, recursive: bool) -> tuple[str, list[pafs.FileInfo]]:
    """(path of ``uri`` in its filesystem, FileInfo of every file under it); none when missing."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return path, []
    return path, [fi for fi in infos if fi.type == pafs.FileType.File]


def list_files(uri: str, suffix: str = "", recursive: bool = False, include_hidden: bool = False) -> list[str]:
    """Sorted URIs of the files under a folder ending in ``suffix``; hidden (``.``/``_``) names are
    skipped unless asked for. A missing folder lists as empty."""
    path, files = _files_under(uri, recursive)
    out = []
    for fi in files:
        rel_parts = fi.path[len(path):].strip("/").split("/")
        if not fi.base_name.endswith(suffix) or (
                not include_hidden and any(p.startswith((".", "_")) for p in rel_parts)):
            continue
        out.append(_uri_of(normalize(uri), path, fi.path))
    return sorted(out)


def tree_listing(uri: str, skip: Iterable[str] = ()) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of every file under a folder, for fingerprints."""
    path, files = _files_under(uri, recursive=True)
    skip = set(skip)
    return sorted((fi.path[len(path):].lstrip("/"), int(fi.size or 0), int(fi.mtime_ns or 0))
                  for fi in files if fi.base_name not in skip)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _tmp_name(path: str) -> str:
    d, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f".{name}.{uuid.uuid4().hex[:12]}.tmp"
    return f"{d}/{tmp}" if d else tmp


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object: temp name + move locally, a direct PUT on object stores."""
    fs, path = resolve(uri)
    # compression=None: the bytes are stored as given (pyarrow would gzip a ``.gz`` name again).
    if is_local(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = _tmp_name(path)
        with fs.open_output_stream(tmp, compression=None) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)


def write_file(local_path: str, uri: str) -> None:
    """Write a local file as one whole object, streamed (a large model.pt is never held in memory):
    temp name + move locally, a direct upload on object stores."""
    fs, path = resolve(uri)
    local = pafs.LocalFileSystem()
    if is_local(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = _tmp_name(path)
        pafs.copy_files(local_path, tmp, source_filesystem=local, destination_filesystem=fs)
        fs.move(tmp, path)
    else:
        pafs.copy_files(local_path, path, source_filesystem=local, destination_filesystem=fs)


def read_bytes(uri: str) -> bytes:
    """The object's bytes as stored (a ``.gz`` object is not decompressed)."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, default=str))


def read_json(uri: str, default: Any = None) -> Any:
    """The parsed JSON object, or ``default`` when the file is missing or not valid JSON."""
    try:
        return json.loads(read_text(uri))
    except (FileNotFoundError, OSError, json.JSONDecodeError, UnicodeDecodeError):
        return default


def remove_temp_files(folder: str) -> int:
    """Delete the ``.<name>.<id>.tmp`` objects a killed writer left behind. Returns how many."""
    n = 0
    for f in list_files(folder, suffix=".tmp", include_hidden=True):
        if basename(f).startswith("."):
            delete_file(f)
            n += 1
    return n


# ----------------------------------------------------------------------------- Parquet


def write_table(table: pa.Table, uri: str, **parquet_kwargs: Any) -> None:
    """Write one Parquet file atomically (a crash never leaves half a file under the final name)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_kwargs)
    write_bytes(uri, buf.getvalue())


def read_parquet_file(uri: str, columns: Optional[list[str]] = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a contract: the file itself, or every visible part under a folder."""
    if is_file(uri):
        return [normalize(uri)]
    if not is_dir(uri):
        raise FileNotFoundError(f"{uri}: no such Parquet file or folder")
    return list_files(uri, suffix=".parquet", recursive=True)


def read_table(uri: str, columns: Optional[list[str]] = None) -> Optional[pa.Table]:
    """All Parquet parts of a file or folder as one table; None when there are no parts."""
    import pyarrow.dataset as pads

    files = parquet_files(uri)
    if not files:
        return None
    fs, _ = resolve(uri)
    paths = [resolve(f)[1] for f in files]
    return pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=columns)


def parquet_schema(uri: str) -> Optional[pa.Schema]:
    """The schema of the first part (None when there are none), without reading rows."""
    files = parquet_files(uri)
    if not files:
        return None
    fs, path = resolve(files[0])
    return pq.read_schema(path, filesystem=fs)


# ----------------------------------------------------------------------------- Ray Data


def ray_read_parquet(uri: str, **kwargs: Any):
    """A Ray dataset over the Parquet parts of a folder (or one file), read through ``filesystem=``."""
    import ray

    files = parquet_files(uri)
    fs, _ = resolve(uri)
    return ray.data.read_parquet([resolve(f)[1] for f in files], filesystem=fs, **kwargs)


def ray_write_parquet(ds, uri: str, **kwargs: Any) -> None:
    """Write a Ray dataset as Parquet parts into a folder through ``filesystem=``."""
    fs, path = resolve(uri)
    makedirs(uri)
    ds.write_parquet(path, filesystem=fs, **kwargs)


# ----------------------------------------------------------------------------- model folders


CONTENT_INDEX = "_content.json"


def sha256_file(path: str) -> str:
    """sha256 of a local file (``assets.sha256_files`` of one file)."""
    from slim_ray.assets import sha256_files

    return sha256_files([path])


def upload_dir(local_dir: str, uri: str) -> int:
    """Copy a local folder (a model export, a checkpoint) to ``uri``, then write its content index
    (``_content.json``: sha256 of every file) last. Returns the files copied."""
    index = {}
    same_place = is_local(uri) and os.path.abspath(local_dir) == normalize(uri)
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            if rel == CONTENT_INDEX:
                continue
            index[rel] = sha256_file(src)
            if same_place:
                continue
            fs, path = resolve(join(uri, rel))
            if is_local(uri):
                fs.create_dir(os.path.dirname(path), recursive=True)
            pafs.copy_files(src, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    write_json(join(uri, CONTENT_INDEX), index)
    return 0 if same_place else len(index)


def download_dir(uri: str, local_dir: str) -> int:
    """Copy a folder from storage to a local folder. Returns the files copied."""
    n = 0
    src_fs, src_path = resolve(uri)
    for rel, _, _ in tree_listing(uri):
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        pafs.copy_files(f"{src_path}/{rel}", dst, source_filesystem=src_fs,
                        destination_filesystem=pafs.LocalFileSystem())
        n += 1
    return n


def content_key(uri: str) -> str:
    """A short identity of a folder's content: the hash of its content index when ``upload_dir``
    wrote one, else of its listing (names, sizes, mtimes)."""
    index = read_json(join(uri, CONTENT_INDEX))
    basis = index if isinstance(index, dict) else tree_listing(uri, skip=(CONTENT_INDEX,))
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def local_copy(uri: str, cache_dir: Optional[str] = None) -> str:
    """A local folder holding the content of ``uri``: the folder itself when it is local, else a
    copy fetched once per node into ``<cache>/storage/<content key>/`` (written under a temp name
    and renamed, so a crashed fetch is never used)."""
    if is_local(uri):
        return normalize(uri)
    if not is_dir(uri):
        raise FileNotFoundError(f"{uri}: no such folder on storage")
    from slim_ray.assets import cache_dir as slim_ray_cache

    root = os.path.join(str(slim_ray_cache(cache_dir)), "storage")
    dst = os.path.join(root, f"{basename(uri)}-{content_key(uri)}")
    if os.path.isdir(dst):
        return dst
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=root)
    try:
        download_dir(uri, tmp)
        try:
            os.replace(tmp, dst)
        except OSError:  # another process on this node published it first
            if not os.path.isdir(dst):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
