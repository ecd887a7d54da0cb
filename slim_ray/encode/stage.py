"""``slim-ray encode``: embed item texts and user rationales with one sentence-transformer.

    items                      (column text)              -> embeddings/items/    kind=item, id=item_id
    rationales/teacher/  (text, error == null, 1 per user) -> embeddings/teacher/  kind=user, id=user_id
    rationales/student/  (same)                            -> embeddings/student/  kind=user, id=user_id

Work is spread over ONE Ray Data actor pool for all three outputs (``encode.num_actors`` encoder
copies, one GPU each when the cluster has GPUs), texts sorted by length so a batch holds texts of
similar length; each output gets its own Parquet parts as results stream back. Resumable: rows
whose id already has a vector made from the same text by the same encoder settings are reused,
not re-encoded (see ``slim_ray.encode.store``). A missing rationales folder is skipped with a note
in the summary (e.g. before any rationale exists).

When a user has several usable rationales, the one with the longest history prefix is embedded
(ties: smallest rationale_key), so the choice is deterministic.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray.data.io import read_items, read_rationales
from slim_ray.encode import store
from slim_ray.encode.encoder import EncoderActor, EncoderSpec

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


def item_inputs(path: str) -> pa.Table:
    """(id, text) of every item; an item without text is an error naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: items not found (run `slim-ray prepare` first)")
    t = read_items(path, columns=["item_id", "text"])
    bad = pc.or_(pc.is_null(t.column("text")), pc.equal(pc.utf8_trim_whitespace(t.column("text")), ""))
    bad = pc.fill_null(bad, True)
    if pc.any(bad).as_py():
        ids = t.filter(bad).column("item_id").to_pylist()[:5]
        raise ValueError(f"{path}: column 'text' is empty for item_id {ids} (every item needs a text to encode)")
    return pa.table({"id": t.column("item_id"), "text": t.column("text")})


def rationale_inputs(path: str) -> Optional[pa.Table]:
    """(id=user_id, text) with one usable rationale per user, or None when the folder is missing."""
    if not os.path.exists(path):
        return None
    t = read_rationales(path, columns=["user_id", "prefix_len", "rationale_key", "text", "error"])
    ok = pc.and_(pc.is_null(t.column("error")), pc.invert(pc.is_null(t.column("text"))))
    t = t.filter(ok)
    t = t.filter(pc.not_equal(pc.utf8_trim_whitespace(t.column("text")), ""))
    t = t.sort_by([("user_id", "ascending"), ("prefix_len", "descending"), ("rationale_key", "ascending")])
    users = t.column("user_id").to_numpy()
    if len(users):
        first = np.ones(len(users), dtype=bool)
        first[1:] = users[1:] != users[:-1]
        t = t.filter(pa.array(first))
    return pa.table({"id": t.column("user_id"), "text": t.column("text")})


def with_keys(inputs: pa.Table, spec: EncoderSpec) -> pa.Table:
    keys = [spec.key(text) for text in inputs.column("text").to_pylist()]
    return inputs.append_column(store.ENCODE_KEY, pa.array(keys, pa.string()))


# --------------------------------------------------------------------------- Ray Data job


def _contract_table(batch: pa.Table, kind: str, spec: EncoderSpec) -> pa.Table:
    n = batch.num_rows
    dim = batch.schema.field("vector").type.list_size
    return pa.Table.from_arrays(
        [
            batch.column("id").cast(pa.int64()),
            pa.array([kind] * n, pa.string()),
            pa.array([spec.model_id] * n, pa.string()),
            batch.column("vector").cast(pa.list_(pa.float32(), dim)),
            batch.column(store.ENCODE_KEY),
        ],
        schema=store.output_schema(dim),
    )


def encode_with_ray(todo: pa.Table, targets: list[tuple[str, str]], spec: EncoderSpec, cfg) -> dict[str, Any]:
    """Encode ``todo`` (id, text, encode_key, target) in ONE actor pool -- items and every role's
    rationales together, so the pool starts and loads the model once -- and write each row to its
    target folder (``targets[target] = (out_dir, kind)``) in parts, as results arrive."""
    import ray
    import ray.data

    from slim_ray.runtime import init_ray

    ecfg = cfg.encode
    init_ray(cfg.ray)
    gpus = ecfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    n = todo.num_rows
    # Texts of similar length share a batch (short item texts apart from long rationales): less padding.
    order = pc.sort_indices(pc.utf8_length(todo.column("text")))
    todo = todo.take(order)
    # Enough blocks for every actor to stay busy and for parts to stream out, none smaller than a batch.
    n_blocks = max(ecfg.num_actors * 4, math.ceil(n / ecfg.rows_per_file))
    n_blocks = max(1, min(n_blocks, math.ceil(n / ecfg.batch_size)))
    ds = ray.data.from_arrow(todo).repartition(n_blocks)
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs=dict(
            path=spec.path, batch_size=ecfg.batch_size, dtype=spec.dtype, normalize=spec.normalize,
            device=ecfg.device if gpus else "cpu", max_seq_length=spec.max_seq_length,
        ),
        batch_size=ecfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=ecfg.num_actors),
        num_cpus=ecfg.num_cpus_per_actor,
        num_gpus=gpus,
    )
    t0 = time.perf_counter()
    buffers: dict[int, list[pa.Table]] = {i: [] for i in range(len(targets))}
    stats = {i: {"encoded": 0, "parts_written": 0, "encoder_s": 0.0} for i in range(len(targets))}
    dim = None

    def flush(i: int) -> None:
        if buffers[i]:
            t = pa.concat_tables(buffers[i])
            out_dir, kind = targets[i]
            store.write_part(_contract_table(t, kind, spec), out_dir)
            stats[i]["encoded"] += t.num_rows
            stats[i]["parts_written"] += 1
            buffers[i] = []

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        dim = batch.schema.field("vector").type.list_size
        tgt = batch.column("target").to_numpy()
        for i in np.unique(tgt).tolist():
            part = batch.filter(pa.array(tgt == i))
            stats[i]["encoder_s"] += float(pc.sum(part.column("encode_s")).as_py() or 0.0)
            buffers[i].append(part.drop_columns(["encode_s", "target"]))
            if sum(b.num_rows for b in buffers[i]) >= ecfg.rows_per_file:
                flush(i)
    for i in buffers:
        flush(i)
    wall = time.perf_counter() - t0
    encoder_s = sum(st["encoder_s"] for st in stats.values())
    for st in stats.values():
        st["encoder_rows_per_s"] = round(st["encoded"] / st["encoder_s"], 1) if st["encoder_s"] > 0 else None
        st["encoder_s"] = round(st["encoder_s"], 2)
    job = {
        "rows": n, "dim": dim, "wall_s": round(wall, 2),
        "rows_per_s": round(n / wall, 1) if wall > 0 else None,
        "encoder_s": round(encoder_s, 2),
        "encoder_rows_per_s": round(n / encoder_s, 1) if encoder_s > 0 else None,
        "num_actors": ecfg.num_actors, "num_gpus_per_actor": gpus, "batch_size": ecfg.batch_size,
    }
    return {"job": job, "targets": stats}


# --------------------------------------------------------------------------- the stage


def prepare_folder(inputs: pa.Table, out_dir: str, spec: EncoderSpec) -> store.Plan:
    """Bring ``out_dir``'s existing rows in line with ``inputs`` (id, text): drop stale and
    duplicate rows, and return what is left to encode."""
    os.makedirs(out_dir, exist_ok=True)
    store.clean_temp_files(out_dir)
    p = store.plan(out_dir, with_keys(inputs, spec))
    if p.compact:
        logger.warning("[encode] %s: dropping stale/duplicate rows, keeping %d", out_dir, p.reused)
        store.compact(out_dir, p.keep, p.files)
    return p


def run_encode(cfg) -> dict[str, Any]:
    """Stage function (see module doc). Returns counts, throughput and the encoder's identity."""
    layout, ecfg = cfg.layout, cfg.encode
    spec = EncoderSpec.from_config(ecfg)
    summary: dict[str, Any] = {
        "encoder": spec.model_id, "encoder_path": spec.path, "encoder_fingerprint": spec.fingerprint[:16],
        "dtype": spec.dtype, "normalize": spec.normalize, "outputs": {}, "notes": [], "job": None,
    }
    jobs: list[tuple[str, str, str, str]] = [("items", layout.items, layout.item_embeddings, "item")]
    jobs += [(role, layout.rationales(role), layout.user_embeddings(role), "user") for role in ecfg.roles]
    todo, targets, names = [], [], []
    for name, src, out, kind in jobs:
        inputs = item_inputs(src) if kind == "item" else rationale_inputs(src)
        if inputs is None:
            note = f"{name}: no rationales at {src}, skipped"
            summary["notes"].append(note)
            logger.warning("[encode] %s", note)
            continue
        p = prepare_folder(inputs, out, spec)
        summary["outputs"][name] = {"input_rows": inputs.num_rows, "reused": p.reused, "encoded": 0,
                                    "parts_written": 0, "out": out}
        if p.todo.num_rows:
            todo.append(p.todo.append_column("target", pa.array([len(targets)] * p.todo.num_rows, pa.int32())))
            targets.append((out, kind))
            names.append(name)
    if todo:
        res = encode_with_ray(pa.concat_tables(todo), targets, spec, cfg)
        summary["job"] = res["job"]
        for i, name in enumerate(names):
            summary["outputs"][name].update(res["targets"][i])
    for name, out in summary["outputs"].items():
        logger.warning("[encode] %s: %d rows, %d reused, %d encoded", name, out["input_rows"], out["reused"],
                       out["encoded"])
    return summary
