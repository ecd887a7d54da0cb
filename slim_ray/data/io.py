"""Read and write the stage contracts (Parquet datasets: a file or a folder of files).

Every reader validates the columns against ``slim_ray.data.schemas`` and names the path on error.
"""

from __future__ import annotations

import os
from typing import Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, SEQUENCES_SCHEMA, check_columns


def _parquet_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such Parquet file or folder")
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(path)
        for f in names
        if f.endswith(".parquet") and not f.startswith((".", "_"))
    )
    return files


def read_table(path: str, expected: Optional[pa.Schema] = None, columns: Optional[list[str]] = None) -> pa.Table:
    """Read a Parquet file or folder; check ``expected`` columns (naming the path) if given."""
    files = _parquet_files(path)
    if not files:
        if expected is not None:
            return expected.empty_table() if columns is None else expected.empty_table().select(columns)
        raise FileNotFoundError(f"{path}: no Parquet files")
    dataset = pads.dataset(files, format="parquet")
    if expected is not None:
        check_columns(dataset.schema, expected if columns is None else pa.schema([expected.field(c) for c in columns]), path)
    return dataset.to_table(columns=columns)


def read_items(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return read_table(path, ITEMS_SCHEMA, columns)


def read_sequences(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return read_table(path, SEQUENCES_SCHEMA, columns)


def read_rationales(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return read_table(path, RATIONALES_SCHEMA, columns)


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file atomically (temp file + rename): a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
