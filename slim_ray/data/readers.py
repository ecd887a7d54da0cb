"""Readers: raw logs -> Arrow tables of interactions and of item metadata.

Supported formats (``PrepareConfig.source``):

- RecBole atomic files (``movielens``, ``atomic``): tab-separated, header ``name:type`` per column.
- Amazon Reviews JSON lines (``amazon``): reviews ``{reviewerID, asin, overall, unixReviewTime}``,
  metadata ``{asin, title, brand, category: [..], description}``; plain or ``.gz``. The older
  2014 metadata written as Python dict literals is accepted too.
- Tabular (``tabular``): Parquet (by row group) or CSV (header row), columns mapped by the config.

Work is cut into *pieces* that Ray Data parses in parallel: byte ranges of plain text files (a line
belongs to the range it starts in), the whole stream of a ``.gz`` file (parsed piece by piece, so
memory stays bounded), row groups of Parquet files. Every interaction row gets ``ord``, a 64-bit key
that grows with (file, position in file): it is the stable tie-break of equal timestamps.

Parsing has a fast path (pyarrow's CSV/JSON parsers on the whole piece) and a careful path (line by
line in Python) that runs only when the fast path fails or finds nulls: it names the file, line and
field of the first bad line (``on_bad_lines=error``) or drops bad lines and counts them
(``on_bad_lines=skip``).
"""

from __future__ import annotations

import ast
import csv
import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from slim_ray import storage

FILE_BITS, PIECE_BITS, ROW_BITS = 13, 24, 26
MAX_EXAMPLES = 5

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_key", pa.string()),
        pa.field("item_key", pa.string()),
        pa.field("timestamp", pa.int64()),
        pa.field("ord", pa.int64()),
        pa.field("rating", pa.float64()),
    ]
)

ITEM_META_SCHEMA = pa.schema(
    [
        pa.field("item_key", pa.string()),
        pa.field("title", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("brand", pa.string()),
        pa.field("year", pa.int64()),
        pa.field("description", pa.string()),
        pa.field("ord", pa.int64()),
    ]
)


class BadInputError(ValueError):
    """Raw input that cannot be used; the message names the file and the line/field."""


def make_ord(file_idx: int, piece: int, row):
    """Stable order key of a row: (file index, piece index, row in piece) packed into an int64."""
    return (file_idx << (PIECE_BITS + ROW_BITS)) | (piece << ROW_BITS) | row


# --------------------------------------------------------------------------- inputs


def _expand_uri(spec: str, what: str) -> list[str]:
    """``expand_paths`` for a storage URI (s3://, gs://, ...): a file, a folder, or a glob in
    the last path part (``s3://bucket/reviews/part-*.json.gz``)."""
    import fnmatch

    spec = storage.normalize(spec)
    parent, name = spec.rsplit("/", 1)
    if any(ch in name for ch in "*?["):
        return [f for f in storage.list_files(parent) if fnmatch.fnmatch(storage.basename(f), name)]
    if storage.is_dir(spec):
        return [f for f in storage.list_files(spec, recursive=True)
                if not f.endswith((".crc", ".json.tmp"))]
    if not storage.is_file(spec):
        raise BadInputError(f"{spec}: {what} file does not exist")
    return [spec]


def expand_paths(spec: str, what: str) -> list[str]:
    """A file, a folder (all visible files inside, sorted) or a glob -> sorted list of files.
    ``spec`` may be a local path or a storage URI."""
    if not storage.is_local(spec):
        files = _expand_uri(spec, what)
        if not files:
            raise BadInputError(f"{spec}: no {what} files found")
        if len(files) >= 1 << FILE_BITS:
            raise BadInputError(f"{spec}: {len(files)} files; at most {(1 << FILE_BITS) - 1} are supported")
        return files
    spec = os.path.expanduser(storage.normalize(spec))
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(spec)
            for f in names
            if not f.startswith((".", "_")) and not f.endswith((".crc", ".json.tmp"))
        )
    elif any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
    else:
        files = [spec]
    if not files:
        raise BadInputError(f"{spec}: no {what} files found")
    if len(files) >= 1 << FILE_BITS:
        raise BadInputError(f"{spec}: {len(files)} files; at most {(1 << FILE_BITS) - 1} are supported")
    for f in files:
        if not os.path.exists(f):
            raise BadInputError(f"{f}: {what} file does not exist")
        if not os.path.isfile(f) or not os.access(f, os.R_OK):
            raise BadInputError(f"{f}: {what} file is not readable")
    return files


def file_kind(path: str, source: str) -> str:
    """atomic | csv | json | parquet, from the source and the file name."""
    name = path[:-3] if path.endswith(".gz") else path
    if source in ("movielens", "atomic"):
        return "atomic"
    if source == "amazon":
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".json", ".jsonl", ".ndjson")):
        return "json"
    return "csv"


class _NativeRaw(io.RawIOBase):
    """A pyarrow input file as a Python raw stream (for ``io.BufferedReader``: readline, seek)."""

    def __init__(self, native):
        self._f = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_raw(path: str):
    """A seekable binary file: the builtin ``open`` for local paths, pyarrow's filesystem for URIs."""
    if storage.is_local(path):
        return open(storage.normalize(path), "rb")
    fs, p = storage.resolve(path)
    return io.BufferedReader(_NativeRaw(fs.open_input_file(p)), buffer_size=1 << 20)


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    return pq.ParquetFile(p, filesystem=fs)


def file_size(path: str) -> int:
    return int(storage.info(path).size or 0)


def open_binary(path: str):
    try:
        f = _open_raw(path)
        if path.endswith(".gz"):
            return io.BufferedReader(gzip.GzipFile(fileobj=f))  # type: ignore[arg-type]
        return f
    except OSError as e:
        raise BadInputError(f"{path}: cannot read file: {e.strerror or e}") from e


def read_header(path: str, kind: str, delimiter: str) -> list[str]:
    """Column names of an atomic/CSV file (types after ':' dropped)."""
    try:
        with open_binary(path) as f:
            line = f.readline()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadInputError(f"{path}: cannot read file: {e}") from e
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    if not text:
        raise BadInputError(f"{path}: line 1: empty file or missing header row")
    names = next(csv.reader([text], delimiter=delimiter)) if kind == "csv" else text.split(delimiter)
    if kind == "atomic":
        names = [n.split(":", 1)[0] for n in names]
    return [n.strip() for n in names]


def parquet_columns(path: str) -> list[str]:
    try:
        return list(_parquet_file(path).schema_arrow.names)
    except Exception as e:
        raise BadInputError(f"{path}: cannot read Parquet file: {e}") from e


@dataclass
class TableSpec:
    """How to read one logical table (interactions or items) from its files."""

    role: str  # "interactions" | "items"
    files: list[str]
    kind: str  # atomic | csv | json | parquet
    cols: dict[str, Optional[str]]  # logical -> physical (None: absent)
    required: tuple[str, ...]
    delimiter: str = "\t"
    list_sep: str = " "
    headers: dict[str, list[str]] = field(default_factory=dict)  # file -> column names
    alternatives: dict[str, list[str]] = field(default_factory=dict)  # JSON: other names to try
    on_bad_lines: str = "error"
    chunk_bytes: int = 32 << 20


INTERACTION_DEFAULTS = {
    "movielens": dict(user="user_id", item="item_id", timestamp="timestamp", rating="rating"),
    "atomic": dict(user="user_id", item="item_id", timestamp="timestamp", rating="rating"),
    "amazon": dict(user="reviewerID", item="asin", timestamp="unixReviewTime", rating="overall"),
    "tabular": dict(user="user_id", item="item_id", timestamp="timestamp", rating="rating"),
}
# Candidates, first present wins (unless the config maps the column explicitly).
ITEM_DEFAULTS = {
    "movielens": dict(item_key=["item_id"], title=["movie_title", "title"], categories=["class", "genre"],
                      brand=[], year=["release_year", "year"], description=[]),
    "atomic": dict(item_key=["item_id"], title=["title", "movie_title", "name"],
                   categories=["categories", "class", "genre", "category"], brand=["brand"],
                   year=["release_year", "year"], description=["description"]),
    "amazon": dict(item_key=["asin"], title=["title"], categories=["category", "categories"],
                   brand=["brand"], year=[], description=["description"]),
    "tabular": dict(item_key=["item_id"], title=["title"], categories=["categories", "category", "genres"],
                    brand=["brand"], year=["year"], description=["description"]),
}


def _resolve_cols(
    spec: TableSpec, available: Optional[list[str]], defaults: dict[str, Any], explicit: dict[str, str], path: str
) -> None:
    """Fill ``spec.cols``; a required or explicitly mapped column that is missing is an error."""
    for logical, default in defaults.items():
        if logical in explicit:
            name = explicit[logical]
            if available is not None and name not in available:
                raise BadInputError(
                    f"{path}: missing column '{name}' (mapped from '{logical}'); the file has {available}"
                )
            spec.cols[logical] = name
            continue
        cands = default if isinstance(default, list) else [default]
        found = None
        if available is None:  # JSON: fields are looked up per line, first present candidate wins
            found = cands[0] if cands else None
            spec.alternatives[logical] = list(cands[1:])
        else:
            found = next((c for c in cands if c in available), None)
        if found is None and logical in spec.required:
            raise BadInputError(
                f"{path}: missing column '{cands[0] if cands else logical}' ({logical}); the file has {available}"
            )
        spec.cols[logical] = found


def build_specs(cfg, inter_files: list[str], item_files: list[str]) -> tuple[TableSpec, Optional[TableSpec]]:
    """Check headers/columns of every input file up front (cheap) and describe how to parse it."""
    source = cfg.source
    explicit_inter = {k: v for k, v in cfg.columns.items() if k in ("user", "item", "timestamp", "rating")}
    explicit_items = {k: v for k, v in cfg.columns.items() if k not in explicit_inter}
    required = ("user", "item", "timestamp") + (("rating",) if cfg.min_rating is not None else ())

    def make(role, files, defaults, explicit, req):
        kinds = {file_kind(f, source) for f in files}
        if len(kinds) > 1:
            raise BadInputError(f"{role} files mix formats {sorted(kinds)}: {files[:3]}...")
        kind = kinds.pop()
        delim = cfg.delimiter or ("\t" if kind == "atomic" else ",")
        sep = cfg.list_separator or (" " if kind == "atomic" else "|")
        spec = TableSpec(role, files, kind, {}, req, delim, sep, on_bad_lines=cfg.on_bad_lines,
                         chunk_bytes=cfg.chunk_mb << 20)
        first_cols = None
        for f in files:
            if kind in ("atomic", "csv"):
                cols = read_header(f, kind, delim)
                spec.headers[f] = cols
            elif kind == "parquet":
                cols = parquet_columns(f)
            else:
                cols = None
            if first_cols is None:
                _resolve_cols(spec, cols, defaults, explicit, f)
                first_cols = cols
            elif cols is not None:
                for logical, name in spec.cols.items():
                    if name is not None and name not in cols and (logical in req or logical in explicit):
                        raise BadInputError(f"{f}: missing column '{name}' ({logical}); the file has {cols}")
        if kind in ("atomic", "csv"):  # an optional column absent from some files: treat as absent
            for logical, name in list(spec.cols.items()):
                if name is not None and any(name not in h for h in spec.headers.values()):
                    spec.cols[logical] = None
        return spec

    inter = make("interactions", inter_files, INTERACTION_DEFAULTS[source], explicit_inter, required)
    items = make("items", item_files, ITEM_DEFAULTS[source], explicit_items, ("item_key",)) if item_files else None
    return inter, items


# --------------------------------------------------------------------------- pieces


def plan_pieces(spec: TableSpec) -> list[dict[str, Any]]:
    """Cut the files into independently parseable pieces (one Ray Data row each)."""
    tasks = []
    for fi, f in enumerate(spec.files):
        if spec.kind == "parquet":
            n = _parquet_file(f).num_row_groups
            tasks += [dict(file=f, file_idx=fi, start=g, end=g + 1, piece=g) for g in range(n)]
        elif f.endswith(".gz"):
            tasks.append(dict(file=f, file_idx=fi, start=0, end=-1, piece=0))
        else:
            size = file_size(f)
            step = max(1, spec.chunk_bytes)
            starts = list(range(0, max(size, 1), step))
            if len(starts) >= 1 << PIECE_BITS:
                raise BadInputError(f"{f}: too many pieces; raise data.chunk_mb")
            tasks += [dict(file=f, file_idx=fi, start=s, end=min(s + step, size), piece=i)
                      for i, s in enumerate(starts)]
    return tasks


def _count_newlines(path: str, upto: int) -> int:
    n = 0
    with _open_raw(path) as f:
        left = upto
        while left > 0:
            block = f.read(min(left, 16 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def iter_text_pieces(task: dict[str, Any], chunk_bytes: int) -> Iterator[tuple[int, int, bytes, int]]:
    """Yield (piece index, number of the piece's first line (1-based) or -1 if not known yet,
    bytes, byte offset of the piece in the file (plain files; 0 for .gz)).

    A plain file's byte range yields one piece holding every line that starts inside the range.
    A .gz file is streamed in pieces of about ``chunk_bytes`` that end on a line boundary.
    """
    path = task["file"]
    try:
        if path.endswith(".gz"):
            with open_binary(path) as f:
                line_no, piece = 1, 0
                while True:
                    data = f.read(chunk_bytes)
                    if not data:
                        return
                    if not data.endswith(b"\n"):
                        data += f.readline()
                    yield piece, line_no, data, 0
                    line_no += data.count(b"\n")
                    piece += 1
        start, end = task["start"], task["end"]
        with _open_raw(path) as f:
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    f.readline()  # the line started in the previous range
            pos = f.tell()
            if pos >= end and start > 0:
                return
            data = f.read(max(0, end - pos))
            if data and not data.endswith(b"\n"):
                data += f.readline()
            yield task["piece"], (1 if start == 0 else -1), data, pos
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error, ValueError) as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{path}: cannot read file: {e}") from e


class BadLines:
    """Counts and first examples of skipped lines of one piece."""

    def __init__(self, path: str, mode: str, first_line: int, piece_start: int):
        self.path, self.mode = path, mode
        self.first_line, self.piece_start = first_line, piece_start
        self.count = 0
        self.examples: list[str] = []

    def line_no(self, index_in_piece: int, byte_in_piece: int) -> int:
        if self.first_line < 0:  # lazily: count the newlines before the piece once
            self.first_line = _count_newlines(self.path, self.piece_start) + 1
        return self.first_line + index_in_piece

    def bad(self, index_in_piece: int, byte_in_piece: int, what: str) -> None:
        where = f"{self.path}: line {self.line_no(index_in_piece, byte_in_piece)}: {what}"
        if self.mode == "error":
            raise BadInputError(f"{where} (set data.on_bad_lines=skip to drop such lines)")
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(where)


def _to_int_ts(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"field '{name}': {value!r} is not a number")
    if isinstance(value, (int,)):
        return int(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"field '{name}': {str(value)[:40]!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"field '{name}': {value!r} is not a finite number")
    return int(v)


def _to_float(value, name: str) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"field '{name}': {str(value)[:40]!r} is not a number") from None


def _key(value, name: str) -> str:
    if value is None or value == "" or isinstance(value, (dict, list, bool)):
        raise ValueError(f"field '{name}': missing or empty" if value in (None, "") else
                         f"field '{name}': {str(value)[:40]!r} is not an id")
    return str(value)


def _json_line(line: bytes):
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        text = line.decode("utf-8", errors="replace").strip()
        if text.startswith("{'"):  # 2014 Amazon metadata: Python dict literals
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"malformed JSON: {e.msg} at column {e.colno}" if hasattr(e, "msg")
                                 else "malformed JSON") from None
        else:
            raise ValueError(f"malformed JSON: {getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}") from None
    if not isinstance(obj, dict):
        raise ValueError("malformed line: expected a JSON object")
    return obj


def _split_line(line: str, spec: TableSpec) -> list[str]:
    if spec.kind == "csv":
        return next(csv.reader([line], delimiter=spec.delimiter))
    return line.split(spec.delimiter)


# --------------------------------------------------------------------------- interactions


def _interaction_table(users, items, ts, ords, ratings) -> pa.Table:
    return pa.table(
        {
            "user_key": pa.array(users, pa.string()),
            "item_key": pa.array(items, pa.string()),
            "timestamp": pa.array(ts, pa.int64()),
            "ord": pa.array(ords, pa.int64()),
            "rating": pa.array(ratings, pa.float64()),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def _fast_interactions(spec: TableSpec, task, piece: int, data: bytes, skip_header: bool) -> Optional[pa.Table]:
    """pyarrow parse of a whole piece; None when anything is off (the careful path decides)."""
    c = spec.cols
    names = [c["user"], c["item"], c["timestamp"]] + ([c["rating"]] if c.get("rating") else [])
    try:
        if spec.kind in ("atomic", "csv"):
            import pyarrow.csv as pacsv

            header = spec.headers[task["file"]]
            t = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(column_names=header, skip_rows=1 if skip_header else 0,
                                               use_threads=False, block_size=len(data) + 1),
                parse_options=pacsv.ParseOptions(delimiter=spec.delimiter,
                                                  quote_char=False if spec.kind == "atomic" else '"',
                                                  ignore_empty_lines=True),
                convert_options=pacsv.ConvertOptions(
                    include_columns=names,
                    column_types={c["user"]: pa.string(), c["item"]: pa.string(), c["timestamp"]: pa.float64(),
                                  **({c["rating"]: pa.float64()} if c.get("rating") else {})},
                    strings_can_be_null=True,
                ),
            )
        else:
            import pyarrow.json as pajson

            fields = [pa.field(c["user"], pa.string()), pa.field(c["item"], pa.string()),
                      pa.field(c["timestamp"], pa.int64())]
            if c.get("rating"):
                fields.append(pa.field(c["rating"], pa.float64()))
            t = pajson.read_json(
                io.BytesIO(data),
                read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 1),
                parse_options=pajson.ParseOptions(explicit_schema=pa.schema(fields),
                                                  unexpected_field_behavior="ignore"),
            )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    for n in names[:3]:
        col = t.column(n)
        if col.null_count:
            return None
    u, i = t.column(c["user"]), t.column(c["item"])
    if pc.any(pc.equal(pc.utf8_length(u), 0)).as_py() or pc.any(pc.equal(pc.utf8_length(i), 0)).as_py():
        return None
    ts = t.column(c["timestamp"])
    if pa.types.is_floating(ts.type):
        if not pc.all(pc.is_finite(ts)).as_py():
            return None
        ts = pc.cast(pc.floor(ts), pa.int64())
    n = t.num_rows
    import numpy as np

    ords = make_ord(task["file_idx"], piece, np.arange(n, dtype=np.int64))
    rating = t.column(c["rating"]) if c.get("rating") else pa.nulls(n, pa.float64())
    return pa.table({"user_key": u, "item_key": i, "timestamp": ts, "ord": ords, "rating": rating},
                    schema=INTERACTIONS_SCHEMA)


def _careful_interactions(spec: TableSpec, task, piece: int, first_line: int, data: bytes,
                          skip_header: bool, bad: BadLines) -> pa.Table:
    c = spec.cols
    users, items, ts, ords, ratings = [], [], [], [], []
    header = spec.headers.get(task["file"])
    idx = {n: k for k, n in enumerate(header)} if header else {}
    row = 0
    for li, start, line in _content_lines(data, skip_header):
        try:
            if spec.kind == "json":
                obj = _json_line(line)
                missing = [c[k] for k in ("user", "item", "timestamp") if c[k] not in obj]
                if missing:
                    raise ValueError(f"missing field '{missing[0]}'")
                u, it = _key(obj[c["user"]], c["user"]), _key(obj[c["item"]], c["item"])
                t = _to_int_ts(obj[c["timestamp"]], c["timestamp"])
                r = _to_float(obj.get(c["rating"]), c["rating"]) if c.get("rating") else None
            else:
                text = line.decode("utf-8")
                vals = _split_line(text, spec)
                if len(vals) != len(header):
                    raise ValueError(f"malformed line: expected {len(header)} fields, got {len(vals)}")
                u = _key(vals[idx[c["user"]]], c["user"])
                it = _key(vals[idx[c["item"]]], c["item"])
                t = _to_int_ts(vals[idx[c["timestamp"]]].strip(), c["timestamp"])
                r = _to_float(vals[idx[c["rating"]]].strip(), c["rating"]) if c.get("rating") else None
        except UnicodeDecodeError:
            bad.bad(li, start, "not valid UTF-8")
            continue
        except ValueError as e:
            bad.bad(li, start, str(e))
            continue
        users.append(u)
        items.append(it)
        ts.append(t)
        ords.append(make_ord(task["file_idx"], piece, row))
        ratings.append(r)
        row += 1
    return _interaction_table(users, items, ts, ords, ratings)


def parse_interaction_piece(spec: TableSpec, task: dict[str, Any]) -> Iterator[tuple[pa.Table, dict]]:
    """Parse one planned piece -> (interactions table, {'skipped': n, 'examples': [...]}) per sub-piece."""
    if spec.kind == "parquet":
        yield _parquet_interactions(spec, task), {"skipped": 0, "examples": []}
        return
    for piece, first_line, data, offset in iter_text_pieces(task, spec.chunk_bytes):
        skip_header = spec.kind in ("atomic", "csv") and first_line == 1
        table = _fast_interactions(spec, task, piece, data, skip_header)
        bad = BadLines(task["file"], spec.on_bad_lines, first_line, offset)
        if table is None:
            table = _careful_interactions(spec, task, piece, first_line, data, skip_header, bad)
        yield table, {"skipped": bad.count, "examples": bad.examples}


def _parquet_interactions(spec: TableSpec, task) -> pa.Table:
    import numpy as np
    c = spec.cols
    names = [c["user"], c["item"], c["timestamp"]] + ([c["rating"]] if c.get("rating") else [])
    path, g = task["file"], task["start"]
    try:
        t = _parquet_file(path).read_row_group(g, columns=names)
    except Exception as e:
        raise BadInputError(f"{path}: row group {g}: cannot read: {e}") from e
    n = t.num_rows
    for logical in ("user", "item", "timestamp"):
        col = t.column(c[logical])
        if col.null_count:
            first = pc.index(pc.is_null(col), True).as_py()
            what = f"{path}: row group {g} row {first}: field '{c[logical]}' is null"
            if spec.on_bad_lines == "error":
                raise BadInputError(what)
    keep = pc.and_(pc.and_(pc.is_valid(t.column(c["user"])), pc.is_valid(t.column(c["item"]))),
                   pc.is_valid(t.column(c["timestamp"])))
    ords = make_ord(task["file_idx"], g, np.arange(n, dtype=np.int64))
    ts = t.column(c["timestamp"])
    try:
        if pa.types.is_timestamp(ts.type) or pa.types.is_date(ts.type):
            ts = pc.cast(pc.cast(ts, pa.timestamp("s")), pa.int64())
        elif pa.types.is_string(ts.type) or pa.types.is_large_string(ts.type):
            ts = pc.cast(pc.cast(ts, pa.float64()), pa.int64())
        else:
            ts = pc.cast(ts, pa.int64(), safe=False)
    except pa.ArrowInvalid as e:
        raise BadInputError(f"{path}: row group {g}: field '{c['timestamp']}' is not numeric: {e}") from e
    rating = pc.cast(t.column(c["rating"]), pa.float64()) if c.get("rating") else pa.nulls(n, pa.float64())
    out = pa.table({"user_key": pc.cast(t.column(c["user"]), pa.string()),
                    "item_key": pc.cast(t.column(c["item"]), pa.string()),
                    "timestamp": ts, "ord": ords, "rating": rating}, schema=INTERACTIONS_SCHEMA)
    return out.filter(keep)


# --------------------------------------------------------------------------- item metadata


def _as_list(value, sep: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in (value.split(sep) if sep else [value]) if v.strip()]
    out: list[str] = []
    for v in value:  # Amazon 2014: list of lists
        out.extend(_as_list(v, "") if isinstance(v, (list, tuple)) else ([str(v).strip()] if v else []))
    return out


def _as_text(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v)
    s = str(value).strip()
    return s or None


def parse_item_piece(spec: TableSpec, task: dict[str, Any]) -> Iterator[tuple[pa.Table, dict]]:
    """Item metadata rows (``ITEM_META_SCHEMA``, raw values; cleaning happens in ``text``)."""
    from slim_ray.data.text import parse_year

    c = spec.cols
    if spec.kind == "parquet":
        names = [n for n in c.values() if n]
        t = _parquet_file(task["file"]).read_row_group(task["start"], columns=names)
        rows = t.to_pylist()
        pieces = [(task["start"], rows)]
    else:
        pieces = None
    for piece, first_line, data, offset in (iter_text_pieces(task, spec.chunk_bytes) if pieces is None
                                            else [(None, 0, None, 0)]):
        bad = BadLines(task["file"], spec.on_bad_lines, first_line, offset)
        out = {k: [] for k in ITEM_META_SCHEMA.names}
        if pieces is not None:
            piece, records = pieces[0]
            iterable = ((k, None, r) for k, r in enumerate(records))
        else:
            iterable = _item_records(spec, task, first_line, data, bad)
        row = 0
        alts = spec.alternatives

        def get(rec, logical):
            name = c.get(logical)
            if name is None:
                return None
            value = rec.get(name)
            for other in alts.get(logical, ()):
                if value is not None:
                    break
                value = rec.get(other)
            return value

        for li, start, rec in iterable:
            try:
                key = _key(get(rec, "item_key"), c["item_key"])
            except ValueError as e:
                bad.bad(li, start or 0, str(e))
                continue
            out["item_key"].append(key)
            out["title"].append(_as_text(get(rec, "title")))
            out["categories"].append(_as_list(get(rec, "categories"), spec.list_sep))
            out["brand"].append(_as_text(get(rec, "brand")))
            out["year"].append(parse_year(get(rec, "year")))
            out["description"].append(_as_text(get(rec, "description")))
            out["ord"].append(make_ord(task["file_idx"], piece, row))
            row += 1
        yield pa.table(out, schema=ITEM_META_SCHEMA), {"skipped": bad.count, "examples": bad.examples}


def _content_lines(data: bytes, skip_header: bool):
    """(line index in the piece, byte offset, line without EOL) of every non-blank line."""
    pos = 0
    for li, raw in enumerate(data.splitlines(keepends=True)):
        start = pos
        pos += len(raw)
        if li == 0 and skip_header:
            continue
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield li, start, line


def _item_records(spec: TableSpec, task, first_line: int, data: bytes, bad: BadLines):
    header = spec.headers.get(task["file"])
    skip_header = spec.kind in ("atomic", "csv") and first_line == 1
    for li, start, line in _content_lines(data, skip_header):
        try:
            if spec.kind == "json":
                rec = _json_line(line)
            else:
                vals = _split_line(line.decode("utf-8"), spec)
                if len(vals) != len(header):
                    raise ValueError(f"malformed line: expected {len(header)} fields, got {len(vals)}")
                rec = {h: (v if v != "" else None) for h, v in zip(header, vals)}
        except UnicodeDecodeError:
            bad.bad(li, start, "not valid UTF-8")
            continue
        except ValueError as e:
            bad.bad(li, start, str(e))
            continue
        yield li, start, rec


# --------------------------------------------------------------------------- single process


def read_local(spec: TableSpec) -> tuple[pa.Table, int, list[str]]:
    """Read a whole table in this process (reference path): (table, skipped lines, examples)."""
    parse = parse_interaction_piece if spec.role == "interactions" else parse_item_piece
    schema = INTERACTIONS_SCHEMA if spec.role == "interactions" else ITEM_META_SCHEMA
    tables, skipped, examples = [], 0, []
    for task in plan_pieces(spec):
        for table, bad in parse(spec, task):
            tables.append(table)
            skipped += bad["skipped"]
            examples += bad["examples"]
    return (pa.concat_tables(tables) if tables else schema.empty_table()), skipped, examples[:MAX_EXAMPLES]
