"""Tiny items/sequences tables in the Parquet contracts, for the generation tests."""

from __future__ import annotations

import os

import pyarrow as pa

from slim_ray.data.io import write_table
from slim_ray.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA

MOVIES = [
    ("Toy Story", 1995, ["Animation", "Children's", "Comedy"]),
    ("GoldenEye", 1995, ["Action", "Adventure", "Thriller"]),
    ("Heat", 1995, ["Action", "Crime", "Thriller"]),
    ("Godfather, The", 1972, ["Action", "Crime", "Drama"]),
    ("Star Wars", 1977, ["Action", "Adventure", "Sci-Fi"]),
    ("Fargo", 1996, ["Crime", "Drama", "Thriller"]),
    ("Aladdin", 1992, ["Animation", "Children's", "Musical"]),
    ("Alien", 1979, ["Action", "Horror", "Sci-Fi"]),
    ("Casablanca", 1942, ["Drama", "Romance", "War"]),
    ("Lion King, The", 1994, ["Animation", "Children's", "Musical"]),
    ("Terminator, The", 1984, ["Action", "Sci-Fi", "Thriller"]),
    ("Titanic", 1997, ["Action", "Drama", "Romance"]),
]


def items_table() -> pa.Table:
    rows = [
        {"item_id": i + 1, "item_key": str(100 + i), "title": t, "categories": c, "brand": None, "year": y,
         "text": f"{t} ({y}). Genres: {', '.join(c)}."}
        for i, (t, y, c) in enumerate(MOVIES)
    ]
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


def sequences_table(n_users: int = 8, short_users: tuple[int, ...] = ()) -> pa.Table:
    """User u (1..n) has a sequence of 4 + u % 5 items; users in short_users have only 2 items
    (an empty training prefix)."""
    rows = []
    n_items = len(MOVIES)
    for u in range(1, n_users + 1):
        length = 2 if u in short_users else 4 + u % 5
        ids = [((u * 7 + k * 5) % n_items) + 1 for k in range(length)]
        rows.append({"user_id": u, "user_key": f"u{u}", "item_ids": ids,
                     "timestamps": [1_000_000 + 10 * k for k in range(length)]})
    return pa.Table.from_pylist(rows, schema=SEQUENCES_SCHEMA)


def write_prepared(run_dir: str, n_users: int = 8, short_users: tuple[int, ...] = ()) -> None:
    write_table(items_table(), os.path.join(run_dir, "prepared", "items", "part-0.parquet"))
    write_table(sequences_table(n_users, short_users), os.path.join(run_dir, "prepared", "sequences", "part-0.parquet"))
