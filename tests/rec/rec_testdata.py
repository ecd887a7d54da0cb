"""Tiny atomic fixtures for the recommender tests: contracts written to a run folder."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, SEQUENCES_SCHEMA, embeddings_schema
from slim_ray.storage import join, write_table


def write_sequences(root: str, seqs: list[list[int]], n_items: int) -> None:
    """sequences + items contracts for users 1..U with the given item id lists."""
    U = len(seqs)
    write_table(pa.table({
        "user_id": pa.array(np.arange(1, U + 1), pa.int64()),
        "user_key": pa.array([f"u{i}" for i in range(1, U + 1)]),
        "item_ids": pa.array(seqs, pa.list_(pa.int64())),
        "timestamps": pa.array([list(range(len(s))) for s in seqs], pa.list_(pa.int64())),
    }, schema=SEQUENCES_SCHEMA), join(root, "prepared", "sequences", "part-0.parquet"))
    write_table(pa.table({
        "item_id": pa.array(np.arange(1, n_items + 1), pa.int64()),
        "item_key": pa.array([f"i{i}" for i in range(1, n_items + 1)]),
        "title": pa.array([f"item {i}" for i in range(1, n_items + 1)]),
        "categories": pa.array([["c"]] * n_items, pa.list_(pa.string())),
        "brand": pa.array([None] * n_items, pa.string()),
        "year": pa.array([None] * n_items, pa.int64()),
        "text": pa.array([f"item {i}" for i in range(1, n_items + 1)]),
    }, schema=ITEMS_SCHEMA), join(root, "prepared", "items", "part-0.parquet"))


def write_vectors(folder: str, ids, vecs: np.ndarray, kind: str) -> None:
    d = vecs.shape[1]
    write_table(pa.table({
        "id": pa.array(np.asarray(ids), pa.int64()),
        "kind": pa.array([kind] * len(ids)),
        "encoder": pa.array(["test"] * len(ids)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.astype(np.float32).reshape(-1)), d),
    }, schema=embeddings_schema(d)), join(folder, "part-0.parquet"))


def write_rationales(folder: str, user_ids, prefix_lens, role: str) -> None:
    """A rationales contract: one usable rationale per user, written from ``prefix_lens`` items."""
    n = len(user_ids)
    cols = {f.name: pa.array([None] * n, f.type) for f in RATIONALES_SCHEMA}
    cols.update({
        "rationale_key": pa.array([f"k{u}" for u in user_ids]),
        "user_id": pa.array(np.asarray(user_ids), pa.int64()),
        "role": pa.array([role] * n),
        "prefix_len": pa.array(np.asarray(prefix_lens), pa.int64()),
        "text": pa.array([f"rationale of user {u}" for u in user_ids]),
    })
    write_table(pa.table(cols, schema=RATIONALES_SCHEMA), join(folder, "part-0.parquet"))


def tail_cuts(seqs: list[list[int]], tail: int = 3) -> list[int]:
    """Cuts that leave the last ``tail`` training-prefix items as targets (at least 1 item read)."""
    return [max(1, len(s) - 2 - tail) for s in seqs]


def cyclic_sequences(n_users: int, n_items: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """A learnable pattern: each user walks the items in order (i -> i + 1, wrapping), from a random
    start, so the next item is fully determined by the last one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        start, n = int(rng.integers(0, n_items)), int(rng.integers(min_len, max_len + 1))
        out.append([(start + t) % n_items + 1 for t in range(n)])
    return out


def synthetic_run(root: str, n_users: int = 120, n_items: int = 40, text_dim: int = 16,
                  rationale_users: Optional[int] = None, roles=("teacher", "student"), seed: int = 0) -> None:
    """Cyclic sequences + item text vectors + rationale vectors (for the first ``rationale_users``
    users of each role; all when None) in the embeddings contract, and their rationales (the
    contract's prefix_len: a cut that leaves 3 training targets after it)."""
    from slim_ray.layout import RunLayout

    lay = RunLayout(root)
    seqs = cyclic_sequences(n_users, n_items, 8, 16, seed)
    write_sequences(root, seqs, n_items)
    rng = np.random.default_rng(seed + 1)
    write_vectors(lay.item_embeddings, np.arange(1, n_items + 1), rng.normal(size=(n_items, text_dim)), "item")
    k = n_users if rationale_users is None else rationale_users
    for role in roles:
        write_vectors(lay.user_embeddings(role), np.arange(1, k + 1), rng.normal(size=(k, text_dim)), "user")
        write_rationales(lay.rationales(role), np.arange(1, k + 1), tail_cuts(seqs[:k]), role)


def publish_untrained_run(root: str, backbone: str, mode: str, role: Optional[str], seed: int,
                          overrides: list[str], torch_seed: int, n_items: int, init=None) -> str:
    """An untrained (seeded) model published as a finished run folder, ``rec/<bb>-<mode>[-<role>]-s<seed>``:
    what evaluation reads. ``overrides``: ``--set`` lines of the run's config; ``init(model)`` may
    change the weights before they are written. Returns the run folder."""
    import torch

    from slim_ray.config import load_config
    from slim_ray.rec.checkpoint import write_run
    from slim_ray.rec.train import build_model, load_data, run_spec

    variant = f"{mode}:{role}" if role else mode
    cfg = load_config(None, [f"run_dir={root}", f"rec.backbone={backbone}", f"rec.mode={variant}", *overrides])
    spec = run_spec(cfg, backbone, mode, role, seed)
    torch.manual_seed(torch_seed)
    model, fallback = build_model(spec, load_data(spec))
    if init is not None:
        init(model)
    meta = {**{k: spec[k] for k in ("backbone", "mode", "role", "variant", "seed", "hp", "fingerprint",
                                    "missing_rationale", "max_users")},
            "rationale_protocol": spec.get("rationale_protocol"), "best_epoch": 1, "epoch_seconds": [0.5],
            "wall_seconds": 1.0, "fallback_users": len(fallback), "n_items": n_items}
    run_dir = cfg.layout.rec_run(backbone, mode, seed, role)
    write_run(run_dir, model.state_dict(), meta)
    return run_dir
