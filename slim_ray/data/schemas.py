"""The Parquet contracts between stages. The columns are the contract.

items
    item_id int64 (dense 1..N; 0 is padding), item_key string (source id), title string,
    categories list<string>, brand string (nullable), year int64 (nullable),
    text string (rendered description fed to the encoder).
sequences
    user_id int64 (dense 1..U), user_key string, item_ids list<int64>, timestamps list<int64>,
    in time order; ties broken by the row order of the source file (stable).
    Leave-one-out: training prefix = item_ids[:-2], validation target = item_ids[-2],
    test target = item_ids[-1].
rationales
    rationale_key string (sha256 of model id + prompt version + sampling params + prompt text),
    user_id int64, role string (teacher|student), model string, prompt_version string,
    prefix_len int64, prompt string, text string, step1/step2/step3 string,
    n_prompt_tokens int64, n_output_tokens int64, error string (null when fine).
    Leakage guard: prefix_len <= len(item_ids) - 2.
embeddings
    id int64, kind string (item|user), encoder string, vector fixed_size_list<float32>[dim].
"""

from __future__ import annotations

import pyarrow as pa

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("brand", pa.string()),
        pa.field("year", pa.int64()),
        pa.field("text", pa.string()),
    ]
)

SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("user_key", pa.string(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64())),
        pa.field("timestamps", pa.list_(pa.int64())),
    ]
)

RATIONALES_SCHEMA = pa.schema(
    [
        pa.field("rationale_key", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("role", pa.string()),
        pa.field("model", pa.string()),
        pa.field("prompt_version", pa.string()),
        pa.field("prefix_len", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("text", pa.string()),
        pa.field("step1", pa.string()),
        pa.field("step2", pa.string()),
        pa.field("step3", pa.string()),
        pa.field("n_prompt_tokens", pa.int64()),
        pa.field("n_output_tokens", pa.int64()),
        pa.field("error", pa.string()),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("kind", pa.string()),
            pa.field("encoder", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def check_columns(table_or_schema, expected: pa.Schema, where: str) -> None:
    """Raise a ValueError naming ``where`` and every missing or mistyped column."""
    schema = table_or_schema if isinstance(table_or_schema, pa.Schema) else table_or_schema.schema
    problems = []
    for field in expected:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column '{field.name}' ({field.type})")
        elif not schema.field(idx).type.equals(field.type):
            problems.append(
                f"column '{field.name}' has type {schema.field(idx).type}, expected {field.type}"
            )
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
