"""Read and write the stage contracts (Parquet datasets: a file or a folder of files).

Every reader validates the columns against ``slim_ray.data.schemas`` and names the path on error.
The bytes go through ``slim_ray.storage``, so a path may be a local folder or a URI
(``s3://bucket/run/prepared/items``).
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from slim_ray import storage
from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, SEQUENCES_SCHEMA, check_columns


def parquet_files(path: str) -> list[str]:
    """The visible Parquet files of a contract (the file itself, or the parts under a folder)."""
    return storage.parquet_files(path)





def read_table(path: str, expected: Optional[pa.Schema] = None, columns: Optional[list[str]] = None) -> pa.Table:
    """Read a Parquet file or folder; check ``expected`` columns (naming the path) if given."""
    schema = storage.parquet_schema(path)  # FileNotFoundError naming the path when it is missing
    if schema is None:
        if expected is not None:
            return expected.empty_table() if columns is None else expected.empty_table().select(columns)
        raise FileNotFoundError(f"{path}: no Parquet files")
    if expected is not None:
        check_columns(schema, expected if columns is None else pa.schema([expected.field(c) for c in columns]), path)
    return storage.read_table(path, columns=columns)


def read_items(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return read_table(path, ITEMS_SCHEMA, columns)


def read_sequences(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return read_table(path, SEQUENCES_SCHEMA, columns)


def read_rationales(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    return read_table(path, RATIONALES_SCHEMA, columns)


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file atomically: a crash never leaves half a file under its name."""
    storage.write_table(table, path)
