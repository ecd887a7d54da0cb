"""``slim-ray encode``: embed item texts and user rationales with one sentence-transformer.

    items                      (column text)              -> embeddings/items/    kind=item, id=item_id
    rationales/teacher/  (text, error == null, 1 per user) -> embeddings/teacher/  kind=user, id=user_id
    rationales/student/  (same)                            -> embeddings/student/  kind=user, id=user_id
    rationales/<role>/   (column step<k>, encode.rationale_parts) -> embeddings/<role>-step<k>/ (ablation)

Everything runs in Ray Data; the driver holds configs, counts and object references only:

    read_parquet(items | rationales)  --map_batches: (id, text, encode_key, target)-->  materialised
      (rationales first: filter usable rows, groupby(user_id) -> the longest-prefix one)
    per output folder, one Ray task: plan_folder (which rows are already there; rewrite parts
      holding stale or duplicate rows)  -> the (id, encode_key) pairs to reuse, as an object ref
    inputs --map_batches: drop the reused pairs--> --map_batches(EncoderActor, ActorPoolStrategy)-->
      --map_batches(write_parts, batch_size=encode.rows_per_file)--> one Parquet part per output
      folder per batch, published whole by slim_ray.storage; only per-part counts reach the driver.

ONE actor pool serves all three outputs (``encode.num_actors`` encoder copies, one GPU each when
the cluster has GPUs), so the model loads once per actor. Resumable: rows whose id already has a
vector made from the same text by the same encoder settings are reused, not re-encoded. A missing
rationales folder is skipped with a note in the summary (e.g. before any rationale exists).

When a user has several usable rationales, the one with the longest history prefix is embedded
(ties: smallest rationale_key), so the choice is deterministic.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slim_ray import storage
from slim_ray.errors import unwrapped
from slim_ray.layout import FULL_PREFIX_SUFFIX
from slim_ray.data.schemas import ITEMS_SCHEMA, RATIONALES_SCHEMA, check_columns
from slim_ray.encode import store
from slim_ray.encode.encoder import EncoderActor, EncoderSpec

logger = logging.getLogger(__name__)

#: Rows per Ray Data read block, and per key-computing batch.
READ_BATCH_ROWS = 8192
#: Rationale rows per partition when one usable rationale per user is picked: up to this many
#: rows are reduced in one block (no shuffle); more go through groupby(user_id) partitions.
ROWS_PER_PARTITION = 200_000


class EncodeInputError(ValueError):
    """An input row the encoder cannot use (e.g. an item without text); the message names it."""


# --------------------------------------------------------------------------- inputs (Ray Data)


def _count_rows(path: str) -> int:
    """Rows of a Parquet folder from the file footers (no data read)."""
    import pyarrow.parquet as pq

    n = 0
    for f in storage.parquet_files(path):
        fs, p = storage.resolve(f)
        n += pq.ParquetFile(p, filesystem=fs).metadata.num_rows
    return n


def _items_batch(batch: pa.Table, path: str) -> pa.Table:
    text = batch.column("text")
    bad = pc.fill_null(pc.or_(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), "")), True)
    if pc.any(bad).as_py():
        ids = batch.filter(bad).column("item_id").to_pylist()[:5]
        raise EncodeInputError(f"{path}: column 'text' is empty for item_id {ids} (every item needs a text to encode)")
    return pa.table({"id": batch.column("item_id").cast(pa.int64()), "text": text.cast(pa.string())})


def item_inputs(path: str):
    """A Ray dataset of (id, text) for every item; an item without text fails the job naming it."""
    if not storage.exists(path) or not storage.parquet_files(path):
        raise FileNotFoundError(f"{path}: items not found (run `slim-ray prepare` first)")
    check_columns(storage.parquet_schema(path), pa.schema([ITEMS_SCHEMA.field(c) for c in ("item_id", "text")]), path)
    ds = storage.ray_read_parquet(path, columns=["item_id", "text"])
    return ds.map_batches(_items_batch, batch_format="pyarrow", batch_size=READ_BATCH_ROWS, fn_kwargs={"path": path})


def _usable(batch: pa.Table) -> pa.Table:
    ok = pc.and_(pc.is_null(batch.column("error")), pc.is_valid(batch.column("text")))
    batch = batch.filter(ok)
    return batch.filter(pc.not_equal(pc.utf8_trim_whitespace(batch.column("text")), ""))


def _longest_prefix(rows: pa.Table, part: str = "text") -> pa.Table:
    """Usable rationales (all rows of each user they hold) -> (id, text), per user the one with
    the longest prefix (ties: smallest rationale_key). ``part`` (step1/2/3): that row's step text
    instead of the whole answer, the user dropped when the answer lacks it -- the row is chosen on
    the whole answer, so its cut is the one the recommender reads from the rationales folder."""
    t = rows.sort_by([("user_id", "ascending"), ("prefix_len", "descending"), ("rationale_key", "ascending")])
    users = t.column("user_id").to_numpy()
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    t = t.filter(pa.array(first))
    if part != "text":
        t = t.filter(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(t.column(part)), ""), False))
    return pa.table({"id": t.column("user_id").cast(pa.int64()), "text": t.column(part).cast(pa.string())})


def rationale_inputs(path: str, part: str = "text"):
    """A Ray dataset of (id=user_id, text), one usable rationale per user (``part``: the whole
    answer, or one of its steps); None when the folder is missing or empty."""
    if not storage.exists(path) or not storage.parquet_files(path):
        return None
    cols = ["user_id", "prefix_len", "rationale_key", "text", "error"] + ([part] if part != "text" else [])
    check_columns(storage.parquet_schema(path), pa.schema([RATIONALES_SCHEMA.field(c) for c in cols]), path)
    parts = max(1, math.ceil(_count_rows(path) / ROWS_PER_PARTITION))
    ds = storage.ray_read_parquet(path, columns=cols).map_batches(_usable, batch_format="pyarrow",
                                                                  batch_size=READ_BATCH_ROWS)
    if parts == 1:  # a small folder: one block, no shuffle
        return ds.repartition(1).map_batches(_longest_prefix, batch_format="pyarrow", batch_size=None,
                                             fn_kwargs={"part": part})
    return ds.groupby("user_id", num_partitions=parts).map_groups(_longest_prefix, batch_format="pyarrow",
                                                                  fn_kwargs={"part": part})


def _with_keys(batch: pa.Table, spec: EncoderSpec, target: int) -> pa.Table:
    keys = [spec.key(text) for text in batch.column("text").to_pylist()]
    return (batch.append_column(store.ENCODE_KEY, pa.array(keys, pa.string()))
            .append_column("target", pa.array(np.full(batch.num_rows, target, np.int32))))


def with_keys(inputs: pa.Table, spec: EncoderSpec) -> pa.Table:
    """(id, text) -> (id, text, encode_key): the resume key of every row (plain function)."""
    return _with_keys(inputs, spec, 0).drop_columns(["target"])


# --------------------------------------------------------------------------- resume plan (Ray tasks)


def _plan_task(folder: str, key_refs: list, target: int) -> tuple[dict, Optional[pa.Table]]:
    """Runs as a Ray task: ``store.plan_folder`` over the (id, encode_key) blocks of one output."""
    import ray

    blocks = [b.filter(pc.equal(b.column("target"), target)).select(store.KEY_COLUMNS) for b in ray.get(key_refs)]
    want = pa.concat_tables(blocks) if blocks else pa.table({"id": pa.array([], pa.int64()),
                                                            store.ENCODE_KEY: pa.array([], pa.string())})
    plan = store.plan_folder(folder, want)
    return {**plan.summary(), "node_id": ray.get_runtime_context().get_node_id()}, plan.kept


def _drop_reused(batch: pa.Table, kept_refs: dict) -> pa.Table:
    """Rows of ``batch`` whose (id, encode_key) is not already in their output folder."""
    import ray

    out = []
    for target in np.unique(batch.column("target").to_numpy()).tolist():
        part = batch.filter(pc.equal(batch.column("target"), target))
        ref = kept_refs.get(target)
        kept = ray.get(ref) if ref is not None else None
        if kept is not None and kept.num_rows:
            part = part.join(kept, keys=store.KEY_COLUMNS, join_type="left anti")
        out.append(part)
    return pa.concat_tables(out) if out else batch


# --------------------------------------------------------------------------- writing (Ray Data tasks)


def _contract_table(batch: pa.Table, kind: str, model_id: str) -> pa.Table:
    n = batch.num_rows
    dim = batch.schema.field("vector").type.list_size
    return pa.Table.from_arrays(
        [
            batch.column("id").cast(pa.int64()),
            pa.array([kind] * n, pa.string()),
            pa.array([model_id] * n, pa.string()),
            batch.column("vector").cast(pa.list_(pa.float32(), dim)),
            batch.column(store.ENCODE_KEY),
        ],
        schema=store.output_schema(dim),
    )


def write_parts(batch: pa.Table, targets: list[tuple[str, str]], model_id: str) -> pa.Table:
    """Ray Data task: write the encoded rows of each output folder in ``batch`` as one part.
    Returns one row of counts per part (the only thing that reaches the driver)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    tgt = batch.column("target").to_numpy()
    rows = []
    for i in np.unique(tgt).tolist():
        part = batch.filter(pa.array(tgt == i))
        out_dir, kind = targets[i]
        store.write_part(_contract_table(part, kind, model_id), out_dir)
        actor_nodes = sorted(set(part.column("node_id").to_pylist()))
        per_actor = part.group_by("actor_id").aggregate([("actor_id", "count")])
        rows.append({"target": i, "rows": part.num_rows, "dim": part.schema.field("vector").type.list_size,
                     "encoder_s": float(pc.sum(part.column("encode_s")).as_py() or 0.0),
                     "node_ids": sorted(set(actor_nodes + [node])),
                     "actor_ids": per_actor.column("actor_id").to_pylist(),
                     "actor_rows": per_actor.column("actor_id_count").to_pylist()})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("target", pa.int32()), ("rows", pa.int64()), ("dim", pa.int32()), ("encoder_s", pa.float64()),
        ("node_ids", pa.list_(pa.string())), ("actor_ids", pa.list_(pa.string())),
        ("actor_rows", pa.list_(pa.int64()))]))


def rows_per_actor_batch(ecfg) -> int:
    """Rows of one Ray Data batch sent to an encoder actor (several forward passes)."""
    return ecfg.batch_size * ecfg.forward_passes_per_batch


def encode_with_ray(inputs, kept_refs: dict, targets: list[tuple[str, str]], spec: EncoderSpec, cfg) -> dict[str, Any]:
    """Encode the rows of ``inputs`` (id, text, encode_key, target) not in ``kept_refs`` in ONE
    actor pool -- items and every role's rationales together -- and write each to its target
    folder (``targets[target] = (out_dir, kind)``) in parts of ``encode.rows_per_file`` rows."""
    import ray
    import ray.data

    ecfg = cfg.encode
    gpus = ecfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    # per block (batch_size=None): fused into the actor task, it must not bundle blocks together
    ds = inputs.map_batches(_drop_reused, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"kept_refs": kept_refs})
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs=dict(
            path=spec.path, batch_size=ecfg.batch_size, dtype=spec.dtype, normalize=spec.normalize,
            device=ecfg.device if gpus else "cpu", max_seq_length=spec.max_seq_length,
        ),
        # a Ray Data batch holds several forward passes: the encoder sorts it by length, so a
        # forward pass holds texts of similar length (less padding)
        batch_size=rows_per_actor_batch(ecfg),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=ecfg.num_actors),
        num_cpus=ecfg.num_cpus_per_actor,
        num_gpus=gpus,
    )
    # the writer asks for no CPU: the encoder actors may hold every CPU, and a writer waiting for
    # one would leave their output in the object store; one writer at a time bounds its processes
    ds = ds.map_batches(write_parts, batch_format="pyarrow", batch_size=ecfg.rows_per_file,
                        fn_kwargs={"targets": targets, "model_id": spec.model_id},
                        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=1))
    # dispatch only once every encoder actor has loaded its model: the first one ready would
    # otherwise queue the first blocks while the others load (a small job then runs on one actor)
    ds.context.wait_for_min_actors_s = ecfg.actor_start_timeout_s
    t0 = time.perf_counter()
    stats = {i: {"encoded": 0, "parts_written": 0, "encoder_s": 0.0} for i in range(len(targets))}
    nodes: set[str] = set()
    rows_per_actor: dict[str, int] = {}
    dim = None
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in b.to_pylist():
            st = stats[r["target"]]
            st["encoded"] += r["rows"]
            st["parts_written"] += 1
            st["encoder_s"] += r["encoder_s"]
            dim = r["dim"]
            nodes.update(r["node_ids"])
            for actor, n in zip(r["actor_ids"], r["actor_rows"]):
                rows_per_actor[actor] = rows_per_actor.get(actor, 0) + n
    wall = time.perf_counter() - t0
    n = sum(st["encoded"] for st in stats.values())
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
        # rows each encoder actor encoded (actor id -> rows): an idle actor shows as missing
        "rows_per_actor": dict(sorted(rows_per_actor.items())),
        "rows_per_file": ecfg.rows_per_file,
    }
    return {"job": job, "targets": stats, "node_ids": sorted(nodes)}


# --------------------------------------------------------------------------- the stage


def _gather_inputs(cfg, spec: EncoderSpec, summary: dict) -> tuple[Any, list[tuple[str, str, str]]]:
    """One materialised dataset (id, text, encode_key, target) of every output's inputs, and
    the outputs [(name, out_dir, kind)] in target order."""
    layout, ecfg = cfg.layout, cfg.encode
    jobs = [("items", layout.items, layout.item_embeddings, "item", "text")]
    for role in ecfg.roles:
        parts_of_role = ["text"] if role.endswith(FULL_PREFIX_SUFFIX) else ecfg.rationale_parts  # no step ablation at eval
        for part in parts_of_role:
            name = role if part == "text" else f"{role}-{part}"
            jobs.append((name, layout.rationales(role), layout.user_embeddings(name), "user", part))
    parts, outputs = [], []
    for name, src, out, kind, part in jobs:
        ds = item_inputs(src) if kind == "item" else rationale_inputs(src, part)
        if ds is None:
            note = f"{name}: no rationales at {src}, skipped"
            summary["notes"].append(note)
            logger.warning("[encode] %s", note)
            continue
        parts.append(ds.map_batches(_with_keys, batch_format="pyarrow", batch_size=READ_BATCH_ROWS,
                                    fn_kwargs={"spec": spec, "target": len(outputs)}))
        outputs.append((name, out, kind))
    inputs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # one block per actor batch: an actor task takes whole blocks, so a block of 200k rows would
    # keep one actor busy while the rest of the pool idles
    inputs = inputs.repartition(target_num_rows_per_block=rows_per_actor_batch(ecfg))
    return inputs.materialize(), outputs


def run_encode(cfg) -> dict[str, Any]:
    """Stage function (see module doc). Returns counts, throughput and the encoder's identity."""
    with unwrapped(EncodeInputError):
        return _run_encode(cfg)


def _run_encode(cfg) -> dict[str, Any]:
    import ray

    from slim_ray.runtime import init_ray

    spec = EncoderSpec.from_config(cfg.encode)
    summary: dict[str, Any] = {
        "encoder": spec.model_id, "encoder_path": spec.path, "encoder_fingerprint": spec.fingerprint[:16],
        "dtype": spec.dtype, "normalize": spec.normalize, "outputs": {}, "notes": [], "job": None,
        "node_ids": [],
    }
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    inputs, outputs = _gather_inputs(cfg, spec, summary)
    key_refs = inputs.select_columns(store.KEY_COLUMNS + ["target"]).to_arrow_refs()
    t1 = time.perf_counter()
    plan_remote = ray.remote(num_returns=2)(_plan_task)
    plans = [plan_remote.remote(out, key_refs, i) for i, (_, out, _) in enumerate(outputs)]
    kept_refs, todo = {}, 0
    for i, ((name, out, _), (info_ref, kept_ref)) in enumerate(zip(outputs, plans)):
        info = ray.get(info_ref)
        summary["node_ids"].append(info.pop("node_id"))
        kept_refs[i] = kept_ref if info["reused"] else None
        todo += info["input_rows"] - info["reused"]
        summary["outputs"][name] = {**info, "encoded": 0, "parts_written": 0, "out": out}
    t2 = time.perf_counter()
    if todo:
        res = encode_with_ray(inputs, kept_refs, [(out, kind) for _, out, kind in outputs], spec, cfg)
        summary["job"] = res["job"]
        summary["node_ids"] += res["node_ids"]
        for i, (name, _, _) in enumerate(outputs):
            summary["outputs"][name].update(res["targets"][i])
    summary["node_ids"] = sorted(set(summary["node_ids"]))
    summary["timings"] = {"inputs_s": round(t1 - t0, 2), "plan_s": round(t2 - t1, 2),
                          "encode_s": round(time.perf_counter() - t2, 2)}
    for name, out in summary["outputs"].items():
        logger.warning("[encode] %s: %d rows, %d reused, %d encoded", name, out["input_rows"], out["reused"],
                       out["encoded"])
    return summary
