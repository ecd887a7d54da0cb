"""``slim-ray prepare``: raw logs -> ``prepared/items`` + ``prepared/sequences`` with Ray Data.

The plain transformation lives in ``slim_ray.data.prepare``; this module runs it over Ray:

    pieces of the raw files --map_batches(parse)--> interactions (materialised, object store)
      --map_batches(unique keys)--> driver: vocabularies (users, items; vocabulary-sized)
      --map_batches(encode)--> int rows (user_idx, item_idx, timestamp, ord, bucket)
      --[groupby(bucket).map_groups(dedup) if data.dedup]
      --map_batches(k-core counts), repeated until stable--> driver: sparse counts only
      --groupby(bucket).map_groups(build + write)--> sequences/part-XXXXX.parquet
    metadata pieces --map_batches(parse + keep survivors)--> driver --> items/part-00000.parquet

The driver never holds the interaction log: only vocabularies, alive masks and counts.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from slim_ray import storage
from slim_ray.errors import unwrapped
from slim_ray.data.readers import (
    BadInputError,
    TableSpec,
    build_specs,
    expand_paths,
    parse_interaction_piece,
    parse_item_piece,
    plan_pieces,
)

logger = logging.getLogger(__name__)

ROWS_PER_BUCKET = 500_000


# --------------------------------------------------------------------------- inputs


def input_files(data_cfg) -> tuple[list[str], list[str]]:
    """(interaction files, item metadata files) named by the config (packaged data by default)."""
    if data_cfg.source == "movielens" and not data_cfg.interactions:
        if data_cfg.dataset != "ml-100k":
            raise BadInputError(f"no packaged dataset '{data_cfg.dataset}' (packaged: ml-100k); "
                                "set data.interactions / data.items to your files")
        from slim_ray.assets import movielens_100k

        inter, item = movielens_100k()
        for p in (inter, item):
            if not os.path.isfile(p):  # a file installed with the package, never run data
                raise BadInputError(f"{p}: packaged MovieLens-100K file is missing (pip install --no-deps recbole==1.2.1)")
        return [inter], [item]
    inter = expand_paths(data_cfg.interactions, "interaction")
    items = expand_paths(data_cfg.items, "item metadata") if data_cfg.items else []
    return inter, items


def raw_inputs(cfg) -> dict[str, str]:
    """The raw files the prepare stage reads (for lineage: fingerprinted by the stage runner).

    When the inputs cannot be listed, the fingerprint is taken without them (logged): the stage
    then does not look fresh, runs, and fails with the same error naming the file, which is
    where the user sees it (``input_files`` is the first thing ``run_prepare`` calls).
    """
    try:
        inter, items = input_files(cfg.data)
    except BadInputError as e:
        logger.warning("[prepare] raw inputs not fingerprinted (%s); the stage will report it", e)
        return {}
    out = {f"interactions[{k}]": p for k, p in enumerate(inter)}
    out.update({f"items[{k}]": p for k, p in enumerate(items)})
    return out


# --------------------------------------------------------------------------- Ray helpers


def _bad_line_log_cls():
    import ray

    @ray.remote(num_cpus=0)
    class BadLineLog:
        """Skipped-line counts reported by the parse tasks (keyed by piece: retries don't double count)."""

        def __init__(self):
            self.by_piece: dict[str, tuple[int, list[str]]] = {}

        def add(self, key: str, count: int, examples: list[str]) -> None:
            self.by_piece[key] = (count, examples)

        def summary(self) -> tuple[int, list[str]]:
            total, examples = 0, []
            for key in sorted(self.by_piece):
                n, ex = self.by_piece[key]
                total += n
                examples.extend(ex)
            return total, examples[:5]

    return BadLineLog


def _task_rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _parse_interactions(batch: pa.Table, spec: TableSpec, log) -> Any:
    import ray

    for task in _task_rows(batch):
        for k, (table, bad) in enumerate(parse_interaction_piece(spec, task)):
            if bad["skipped"]:
                ray.get(log.add.remote(f"i:{task['file_idx']}:{task['piece']}:{k}", bad["skipped"], bad["examples"]))
            yield table


def _parse_items(batch: pa.Table, spec: TableSpec, log, vocab_ref, item_new_ref) -> Any:
    import ray

    from slim_ray.data.prepare import select_items

    vocab, item_new = ray.get(vocab_ref), ray.get(item_new_ref)
    for task in _task_rows(batch):
        for k, (table, bad) in enumerate(parse_item_piece(spec, task)):
            if bad["skipped"]:
                ray.get(log.add.remote(f"m:{task['file_idx']}:{task['piece']}:{k}", bad["skipped"], bad["examples"]))
            yield select_items(table, vocab, item_new)


def _encode(batch: pa.Table, uv_ref, iv_ref, num_buckets: int, min_rating) -> pa.Table:
    import ray

    from slim_ray.data.prepare import encode_block

    return encode_block(batch, ray.get(uv_ref), ray.get(iv_ref), num_buckets, min_rating)


def _dedup(group: pa.Table) -> pa.Table:
    from slim_ray.data.prepare import dedup_rows

    return dedup_rows(group)


def _kcore_counts(batch: pa.Table, ua_ref, ia_ref) -> pa.Table:
    import ray

    from slim_ray.data.prepare import kcore_counts

    return kcore_counts(batch, ray.get(ua_ref), ray.get(ia_ref))


def _build_and_write(group: pa.Table, un_ref, in_ref, uv_ref, max_seq_len, out_dir: str) -> pa.Table:
    import ray

    from slim_ray.data.prepare import build_sequences

    node_id = ray.get_runtime_context().get_node_id()
    bucket = int(group.column("bucket")[0].as_py()) if group.num_rows else 0
    seqs = build_sequences(group, ray.get(un_ref), ray.get(in_ref), ray.get(uv_ref), max_seq_len)
    lengths = np.diff(seqs.column("item_ids").combine_chunks().offsets.to_numpy()) if seqs.num_rows else np.zeros(0)
    if seqs.num_rows:  # named by bucket and first user: a bucket split over two calls stays whole
        first = int(seqs.column("user_id")[0].as_py())
        storage.write_table(seqs, storage.join(out_dir, f"part-{bucket:05d}-{first:09d}.parquet"))
    return pa.table({"bucket": [bucket], "users": [seqs.num_rows], "kept": [int(lengths.sum())],
                     "max_len": [int(lengths.max()) if len(lengths) else 0], "node_id": [node_id]})


def _by_bucket(ds, num_buckets: int, fn, fn_kwargs: dict):
    """Apply ``fn`` to all rows of each user bucket: ``groupby(bucket).map_groups`` (the shuffle
    strategy is set for the whole stage, see ``run_prepare``), or, for one bucket, a plain
    repartition into one block (small inputs skip the shuffle machinery)."""
    if num_buckets == 1:
        return ds.repartition(1).map_batches(fn, batch_size=None, batch_format="pyarrow", fn_kwargs=fn_kwargs)
    return ds.groupby("bucket", num_partitions=num_buckets).map_groups(fn, batch_format="pyarrow", fn_kwargs=fn_kwargs)


class _KeySet:
    """Distinct keys merged on the driver as blocks report them; memory ~ 2x the distinct keys."""

    def __init__(self, slack: int = 1_000_000):
        self.parts: list = []
        self.size = 0
        self.distinct = 0
        self.slack = slack

    def add(self, keys) -> None:
        import pyarrow.compute as pc

        self.parts.append(keys)
        self.size += len(keys)
        if self.size > 2 * self.distinct + self.slack:
            merged = pc.unique(pa.chunked_array(self.parts, pa.string()))
            self.parts, self.size = [merged], len(merged)
            self.distinct = len(merged)

    def keys(self):
        return pa.chunked_array(self.parts, pa.string())


def _forget_previous_run(prepared: str) -> None:
    """Drop an earlier run's manifest before its outputs are replaced: if this run dies half-way,
    the folder must not look complete (the stage runner writes the new manifest at the end)."""
    from slim_ray.lineage import MANIFEST

    storage.delete_file(storage.join(prepared, MANIFEST))


# --------------------------------------------------------------------------- the stage


def run_prepare(cfg) -> dict[str, Any]:
    """Raw logs -> items + sequences (the stage function; see the module docstring)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    # Datasets copy the current DataContext when created: set the shuffle for this stage only.
    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    ctx.shuffle_strategy = (ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if cfg.data.shuffle == "sort"
                            else ShuffleStrategy.HASH_SHUFFLE)
    try:
        with unwrapped(BadInputError):
            return _run_prepare(cfg)
    finally:
        ctx.shuffle_strategy = before


class _Clock:
    """Seconds per phase, for the stage summary."""

    def __init__(self):
        self.t0 = self.t = time.time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.laps[name] = round(now - self.t, 2)
        self.t = now


def _run_prepare(cfg) -> dict[str, Any]:
    import ray

    from slim_ray.runtime import init_ray

    clock = _Clock()
    inter_files, item_files = input_files(cfg.data)
    inter_spec, item_spec = build_specs(cfg.data, inter_files, item_files)  # cheap header checks first
    init_ray(cfg.ray)
    log = _bad_line_log_cls().remote()
    clock.lap("ray_init")
    try:
        return _pipeline(cfg, inter_spec, item_spec, log, clock)
    finally:
        ray.kill(log)


def _pipeline(cfg, inter_spec: TableSpec, item_spec: Optional[TableSpec], log, clock: _Clock) -> dict[str, Any]:
    """The six phases in order; each lap of ``clock`` is one phase's seconds in the summary."""
    import ray

    d = cfg.data
    inter_files = inter_spec.files
    raw, n_raw = _read_interactions(inter_spec, log)
    clock.lap("read")
    vocab = _vocabularies(raw, d.max_users)
    clock.lap("vocab")
    num_buckets = d.num_buckets or max(1, -(-n_raw // ROWS_PER_BUCKET))
    uv_ref, iv_ref = ray.put(vocab["users"]), ray.put(vocab["items"])
    enc = _encode_interactions(raw, d, uv_ref, iv_ref, num_buckets)
    del raw  # the encoded copy is materialised: free the parsed strings
    n_enc = enc.count()
    clock.lap("encode")
    if n_enc == 0:
        raise BadInputError(f"{', '.join(inter_files)}: no interactions left after min_rating/max_users")
    kc = _kcore(enc, d, len(vocab["users"]), len(vocab["items"]), inter_files)
    user_new, item_new = kc.new_ids()
    n_users, n_items = int(kc.user_alive.sum()), int(kc.item_alive.sum())
    clock.lap("kcore")
    in_ref = ray.put(item_new)
    st = _write_sequences(cfg, enc, num_buckets, ray.put(user_new), in_ref, uv_ref, n_users)
    clock.lap("sequences")
    info = _write_items(cfg, item_spec, log, iv_ref, in_ref, vocab["items"], item_new)
    clock.lap("items")

    skipped, examples = ray.get(log.summary.remote())
    all_files = inter_files + (item_spec.files if item_spec else [])
    kept = int(np.sum(st.column("kept").to_numpy()))
    return {
        "source": d.source,
        "inputs": all_files[:10] + ([f"... {len(all_files) - 10} more"] if len(all_files) > 10 else []),
        "raw": {"interactions": n_raw, "users": vocab["raw_users"], "items": vocab["raw_items"]},
        "after_filters": {"interactions": n_enc},
        "users": n_users,
        "items": n_items,
        "interactions": kc.interactions,
        "interactions_kept": kept,
        "truncated_by_max_seq_len": kc.interactions - kept,
        "kcore_passes": kc.passes,
        "min_user_count": kc.min_user,
        "min_item_count": d.min_item_count,
        "items_without_metadata": info["items_without_metadata"],
        "skipped_lines": skipped,
        "skipped_examples": examples,
        "num_buckets": num_buckets,
        "node_ids": sorted(set(st.column("node_id").to_pylist())),
        "timings": clock.laps,
        "wall_seconds": round(time.time() - clock.t0, 2),
    }


def _read_interactions(inter_spec: TableSpec, log):
    """Phase 1: parse the raw pieces in parallel; the table stays in the object store."""
    import ray

    pieces = plan_pieces(inter_spec)
    raw = (
        ray.data.from_items(pieces, override_num_blocks=len(pieces))
        .map_batches(_parse_interactions, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"spec": inter_spec, "log": log})
        .materialize()
    )
    n_raw = raw.count()
    if n_raw == 0:
        raise BadInputError(f"{', '.join(inter_spec.files)}: no interactions could be read")
    return raw, n_raw


def _vocabularies(raw, max_users: Optional[int]) -> dict[str, Any]:
    """Phase 2: user and item vocabularies (only distinct keys reach the driver)."""
    from slim_ray.data.prepare import ordered_vocab, unique_keys

    users, items = _KeySet(), _KeySet()
    for b in raw.map_batches(unique_keys, batch_size=None, batch_format="pyarrow").iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        m = b.column("is_user").to_numpy(zero_copy_only=False)
        users.add(b.column("key").filter(pa.array(m)))
        items.add(b.column("key").filter(pa.array(~m)))
    user_vocab = ordered_vocab(users.keys())
    item_vocab = ordered_vocab(items.keys())
    out = {"raw_users": len(user_vocab), "raw_items": len(item_vocab), "items": item_vocab}
    out["users"] = user_vocab.slice(0, max_users) if max_users is not None else user_vocab
    return out


def _encode_interactions(raw, d, uv_ref, iv_ref, num_buckets: int):
    """Phase 3: ints (user_idx, item_idx, timestamp, ord, bucket), users bucketed in contiguous
    ranges, duplicates dropped per bucket when ``data.dedup``; materialised."""
    enc = raw.map_batches(_encode, batch_size=None, batch_format="pyarrow",
                          fn_kwargs={"uv_ref": uv_ref, "iv_ref": iv_ref, "num_buckets": num_buckets,
                                     "min_rating": d.min_rating})
    if d.dedup:
        enc = _by_bucket(enc, num_buckets, _dedup, {})
    return enc.materialize()


def _kcore(enc, d, n_user_vocab: int, n_item_vocab: int, inter_files: list[str]):
    """Phase 4: iterative k-core; each pass sends only sparse counts to the driver."""
    import ray

    from slim_ray.data.prepare import KCore

    kc = KCore(n_user_vocab, n_item_vocab, d.min_user_count, d.min_item_count)
    while True:
        ua_ref, ia_ref = ray.put(kc.user_alive), ray.put(kc.item_alive)
        for b in enc.map_batches(_kcore_counts, batch_size=None, batch_format="pyarrow",
                                 fn_kwargs={"ua_ref": ua_ref, "ia_ref": ia_ref}).iter_batches(
            batch_format="pyarrow", batch_size=None
        ):
            kc.add(b)
        if kc.step():
            break
    kc.check_not_empty(", ".join(inter_files), d.max_users)
    return kc


def _write_sequences(cfg, enc, num_buckets: int, un_ref, in_ref, uv_ref, n_users: int) -> pa.Table:
    """Phase 5: one shuffle by user bucket, each bucket builds and writes its own file. Returns
    the per-bucket stats (users, kept interactions, node id)."""
    import ray

    lay = cfg.layout
    _forget_previous_run(lay.prepared)
    storage.delete_dir(lay.sequences)
    storage.delete_dir(lay.items)
    stats = _by_bucket(
        enc, num_buckets, _build_and_write,
        {"un_ref": un_ref, "in_ref": in_ref, "uv_ref": uv_ref, "max_seq_len": cfg.data.max_seq_len,
         "out_dir": lay.sequences},
    ).to_arrow_refs()
    st = pa.concat_tables(ray.get(stats))
    written_users = int(np.sum(st.column("users").to_numpy()))
    if written_users != n_users:
        raise RuntimeError(f"wrote {written_users} users, expected {n_users}")
    return st


def _write_items(cfg, item_spec: Optional[TableSpec], log, iv_ref, in_ref, item_vocab, item_new) -> dict[str, Any]:
    """Phase 6: the items table, from the metadata of surviving items only."""
    import ray

    from slim_ray.data.prepare import finish_items
    from slim_ray.data.readers import ITEM_META_SCHEMA

    d = cfg.data
    meta_parts = []
    if item_spec is not None:
        mpieces = plan_pieces(item_spec)
        for b in (
            ray.data.from_items(mpieces, override_num_blocks=len(mpieces))
            .map_batches(_parse_items, batch_size=1, batch_format="pyarrow",
                         fn_kwargs={"spec": item_spec, "log": log, "vocab_ref": iv_ref, "item_new_ref": in_ref})
            .iter_batches(batch_format="pyarrow", batch_size=None)
        ):
            meta_parts.append(b)
    meta = (pa.concat_tables([p.select(ITEM_META_SCHEMA.names + ["item_id"]) for p in meta_parts])
            if meta_parts else ITEM_META_SCHEMA.empty_table().append_column("item_id", pa.array([], pa.int64())))
    items_table, info = finish_items(
        meta, item_vocab, item_new, fields=tuple(d.text_fields),
        category_label="Genres" if d.source == "movielens" else "Categories",
        max_title_chars=d.max_title_chars, max_description_chars=d.max_description_chars,
    )
    storage.write_table(items_table, storage.join(cfg.layout.items, "part-00000.parquet"))
    return info
