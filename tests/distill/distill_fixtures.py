"""Tiny contract-shaped inputs for the distill tests: items, sequences, teacher rationales.

The rationale text is templated from each user's history (real structure, fake wording), so a
model can learn it in a few steps and held-out loss must fall.
"""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa

from slim_ray.data.io import write_table
from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, SEQUENCES_SCHEMA

GENRES = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Animation"]
WORDS = ["Star", "River", "Night", "Golden", "Lost", "City", "Dream", "Storm", "Silent", "Blue"]


def make_items(n: int = 40) -> pa.Table:
    rows = []
    for i in range(1, n + 1):
        title = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 3) % len(WORDS)]} {i}"
        cats = [GENRES[i % len(GENRES)], GENRES[(i + 2) % len(GENRES)]]
        rows.append({"item_id": i, "item_key": str(i), "title": title, "categories": cats,
                     "brand": None, "year": 1990 + i % 10,
                     "text": f"{title} ({1990 + i % 10}). Genres: {', '.join(cats)}."})
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


def make_sequences(n_users: int = 16, n_items: int = 40, length: int = 6) -> pa.Table:
    rows = []
    for u in range(1, n_users + 1):
        ids = [((u * 7 + k * 5) % n_items) + 1 for k in range(length)]
        rows.append({"user_id": u, "user_key": f"u{u}", "item_ids": ids,
                     "timestamps": list(range(1000, 1000 + length))})
    return pa.Table.from_pylist(rows, schema=SEQUENCES_SCHEMA)


def rationale_text(history_titles, genre, seen: bool = True):
    """Step 3 names a title from the history when ``seen`` (even user ids)."""
    s1 = f"Step 1: The user enjoys {genre} movies such as {history_titles[-1]}."
    s2 = f"Step 2: Recommend more {genre} films and similar titles."
    pick = f"{history_titles[0]} again" if seen else f"{genre} Classics"
    s3 = f"Step 3: Recommend {genre} movies like {pick} and {genre} Nights."
    return s1, s2, s3


def make_rationales(items: pa.Table, seqs: pa.Table, error_users=(3,), prefix_cut: int = 2) -> pa.Table:
    titles = {r["item_id"]: (r["title"], r["categories"]) for r in items.to_pylist()}
    rows = []
    for r in seqs.to_pylist():
        plen = len(r["item_ids"]) - prefix_cut
        hist = [titles[i] for i in r["item_ids"][:plen]]
        genre = hist[-1][1][0]
        s1, s2, s3 = rationale_text([t for t, _ in hist], genre, seen=r["user_id"] % 2 == 0)
        text = "\n".join([s1, s2, s3])
        err = "timeout" if r["user_id"] in error_users else None
        rows.append({
            "rationale_key": hashlib.sha256(f"k{r['user_id']}".encode()).hexdigest(),
            "user_id": r["user_id"], "role": "teacher", "model": "fixture", "prompt_version": "t1",
            "prefix_len": plen, "prompt": "teacher prompt", "text": None if err else text,
            "step1": s1, "step2": s2, "step3": s3, "n_prompt_tokens": 10,
            "n_output_tokens": 30, "error": err,
        })
    return pa.Table.from_pylist(rows, schema=RATIONALES_SCHEMA)


def write_run(run_dir: str, n_users: int = 16) -> dict:
    """Write the three contracts into a run folder laid out like a real run."""
    from slim_ray.layout import RunLayout

    lay = RunLayout(run_dir)
    items, seqs = make_items(), make_sequences(n_users)
    rats = make_rationales(items, seqs)
    write_table(items, os.path.join(lay.items, "part-0.parquet"))
    write_table(seqs, os.path.join(lay.sequences, "part-0.parquet"))
    write_table(rats, os.path.join(lay.rationales("teacher"), "part-0.parquet"))
    return {"items": items, "sequences": seqs, "rationales": rats}
