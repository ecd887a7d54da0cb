"""``slim-ray teach`` and ``slim-ray reason``: the resumable rationale generation job on Ray Data.

    sequences (Parquet) --read--> PromptStage (actor pool) --engine (hf|vllm|openai)--> write parts
                                  select users, cut the training
                                  prefix, render the prompt, compute
                                  rationale_key, skip done/too-short

Nothing per user happens on the driver: one Ray task reads the ``user_id`` column (8 bytes a user)
to draw the teacher's seeded sample and builds the done set from the output's key columns (8 bytes
a pair); both reach the prompt actors as object references, the driver gets their sizes. It then
streams small per-part summaries for the progress bar, and a last Ray task compacts the folder
against the pairs the prompt actors wanted (held by the tally actor, never by the driver).
Prompts are built, generated, parsed and written inside Ray Data; each batch is written as its own
Parquet part the moment it is done, so a crash loses at most the batches in flight. Rerunning resumes: rows whose
(user_id, rationale_key) already has a successful row are skipped; failed rows (``error`` set) are
generated again. After a successful run ``store.compact`` leaves exactly one row per selected user.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slim_ray import storage
from slim_ray._ray_compat import small_blocks
from slim_ray.data import splits
from slim_ray.data.schemas import SEQUENCES_SCHEMA, check_columns
from slim_ray.generate.config import GenerateConfig
from slim_ray.generate.engines import APPLY, EngineError, node_id, sampling_params
from slim_ray.generate.models import (
    GenerationError, preflight, prompt_settings, read_items, resolve_model, token_counter,
)
from slim_ray.generate.store import (
    OUTPUT_SCHEMA, compact, done_pairs, drop_unreadable_parts, folder_totals, pair_hash, remove_temp_files,
    write_part,
)
from slim_ray.layout import full_prefix_set

logger = logging.getLogger(__name__)

PROMPT_ROW_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64()),
    pa.field("rationale_key", pa.string()),
    pa.field("prefix_len", pa.int64()),
    pa.field("prompt", pa.string()),
    pa.field("messages_json", pa.string()),
    pa.field("history_titles", pa.list_(pa.string())),
])


def run_teach(cfg) -> dict[str, Any]:
    """Teacher rationales for a seeded sample of ``cfg.teacher.num_users`` users."""
    return run_generations(cfg, cfg.teacher, "teacher")


def run_reason(cfg) -> dict[str, Any]:
    """Student rationales for every user (``cfg.student``; model ``distilled`` by default)."""
    return run_generations(cfg, cfg.student, "student")


def run_generations(cfg, gen: GenerateConfig, role: str) -> dict[str, Any]:
    """The role's rationales and, with ``eval_rationale=full_prefix``, a second pass over the same
    users from the whole training prefix into ``rationales/<role>-full/``. Each pass resumes on its
    own; the summary is the first pass's, the second's under ``full_prefix`` (its failed rows are
    counted in ``failed_rows``, so a partial second pass keeps the stage from looking complete)."""
    summary = run_generation(cfg, gen, role)
    if gen.eval_rationale == "full_prefix":
        full = run_generation(cfg, gen.model_copy(update={"rationale_cut": "full_prefix"}), role,
                              out_name=full_prefix_set(role))
        summary["full_prefix"] = full
        summary["failed_rows"] = int(summary.get("failed_rows") or 0) + int(full.get("failed_rows") or 0)
    return summary


class PromptStage:
    """Ray Data actor: sequences -> prompt rows for the users still to do."""

    def __init__(self, items_path: str, settings: dict, tokenizer: Optional[str], plan_refs: list,
                 model_id: str, sampling: dict, min_prefix_len: int, tally):
        """``plan_refs``: [done set, selected users or None] as object references (``resume_plan``)."""
        import ray

        from slim_ray.prompts import PromptBuilder

        self.pb = PromptBuilder(read_items(items_path), count_tokens=token_counter(tokenizer), **settings)
        done, selected = ray.get(list(plan_refs))
        self.selected = None if selected is None else np.unique(selected)
        self.done = done
        self.model_id, self.sampling, self.min_prefix_len, self.tally = model_id, sampling, min_prefix_len, tally
        self.node_id = node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from slim_ray.prompts import rationale_key

        uids = np.asarray(batch["user_id"].to_numpy(zero_copy_only=False), dtype=np.int64)
        seqs = batch["item_ids"].to_pylist()
        mask = np.ones(len(uids), dtype=bool) if self.selected is None else np.isin(uids, self.selected)
        rows: dict[str, list] = {f.name: [] for f in PROMPT_ROW_SCHEMA}
        counts = {"selected": int(mask.sum()), "skipped_short": 0, "skipped_done": 0, "skipped_duplicate": 0, "todo": 0}
        seen: set[int] = set()
        wanted = []
        for uid, seq, m in zip(uids, seqs, mask):
            if not m:
                continue
            if splits.training_length(len(seq or [])) < self.min_prefix_len:
                counts["skipped_short"] += 1
                continue
            if int(uid) in seen:
                counts["skipped_duplicate"] += 1
                continue
            seen.add(int(uid))
            built = self.pb.build(seq)
            key = rationale_key(self.model_id, self.pb.version, self.sampling, built.prompt)
            h = int(pair_hash([uid], [key])[0])
            wanted.append(h)
            i = np.searchsorted(self.done, h)
            if i < len(self.done) and self.done[i] == h:
                counts["skipped_done"] += 1
                continue
            counts["todo"] += 1
            rows["user_id"].append(int(uid))
            rows["rationale_key"].append(key)
            rows["prefix_len"].append(built.prefix_len)
            rows["prompt"].append(built.prompt)
            rows["messages_json"].append(json.dumps(built.messages, ensure_ascii=False))
            rows["history_titles"].append(built.history_titles)
        # wait for it: the driver reads the tally once the data is through, and calls from different
        # callers are not ordered, so a fire-and-forget add could arrive after that read
        ray.get(self.tally.add.remote(counts, np.asarray(wanted, dtype=np.int64), self.node_id))
        return pa.table(rows, schema=PROMPT_ROW_SCHEMA)


def _tally_cls():
    import ray

    @ray.remote(num_cpus=0)
    class Tally:
        """Counts of the prompt stage and the (user, key) pairs the current config wants."""

        def __init__(self):
            self.counts: dict[str, int] = {}
            self.wanted: list[np.ndarray] = []
            self.nodes: set[str] = set()

        def add(self, counts: dict, wanted: np.ndarray, node: str = "") -> None:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + int(v)
            self.wanted.append(wanted)
            if node:
                self.nodes.add(node)

        def get(self):
            """Counts and nodes: what the driver reads."""
            return self.counts, sorted(self.nodes)

        def get_wanted(self) -> np.ndarray:
            """The wanted pairs' hashes (8 bytes a row): read by the compaction task, not the driver."""
            return np.concatenate(self.wanted) if self.wanted else np.zeros(0, dtype=np.int64)

    return Tally


# ------------------------------------------------------------------------------------ writer

SUMMARY_SCHEMA = pa.schema([(k, pa.int64()) for k in ("rows", "errors", "prompt_tokens", "output_tokens")]
                           + [("node_ids", pa.list_(pa.string()))])


def write_batch(batch: pa.Table, out_dir: str, role: str, model: str, prompt_version: str, engine: str,
                items_path: Optional[str] = None, ground_encoder: Optional[str] = None,
                ground_min_cosine: float = 0.8) -> pa.Table:
    """Parse answers, ground Step 3 in the catalog (``items_path``; the index is built once per
    writer process), write one Parquet part, return a one-row summary for the progress bar."""
    from slim_ray.generate.grounding import catalog_index
    from slim_ray.prompts import parse_answer

    n = batch.num_rows
    if n == 0:
        return SUMMARY_SCHEMA.empty_table()
    texts, errors = batch["text"].to_pylist(), batch["error"].to_pylist()
    parsed = [parse_answer(t or "", h or []) if e is None else None
              for t, e, h in zip(texts, errors, batch["history_titles"].to_pylist())]
    cols = {
        "rationale_key": batch["rationale_key"], "user_id": batch["user_id"],
        "role": [role] * n, "model": [model] * n, "prompt_version": [prompt_version] * n,
        "prefix_len": batch["prefix_len"], "prompt": batch["prompt"], "text": texts,
        "step1": [p.step1 if p else None for p in parsed],
        "step2": [p.step2 if p else None for p in parsed],
        "step3": [p.step3 if p else None for p in parsed],
        "n_prompt_tokens": batch["n_prompt_tokens"], "n_output_tokens": batch["n_output_tokens"],
        "error": errors,
        "steps_found": [p.steps_found if p else 0 for p in parsed],
        "seen_items": [p.seen_items if p else [] for p in parsed],
        "engine": [engine] * n,
        "node_id": batch["node_id"] if "node_id" in batch.column_names else [node_id()] * n,
    }
    if items_path:
        index = catalog_index(items_path, ground_encoder, ground_min_cosine)
        cols.update(index.ground_rows(cols["step3"], batch["history_titles"].to_pylist()))
    else:  # no catalog given: grounding unknown
        cols.update(step3_item_ids=[None] * n, step3_grounded=[None] * n, step3_n_history=[None] * n)
    table = pa.table({k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, OUTPUT_SCHEMA.field(k).type))
                      for k, v in cols.items()})
    write_part(table, out_dir)
    engine_nodes = set(batch["node_id"].to_pylist()) if "node_id" in batch.column_names else set()
    nodes = sorted(x for x in engine_nodes | {node_id()} if x)
    ok = [p for p in parsed if p]
    return pa.table({
        "rows": [n], "errors": [n - len(ok)],
        "prompt_tokens": [int(sum(batch["n_prompt_tokens"].to_pylist()))],
        "output_tokens": [int(sum(batch["n_output_tokens"].to_pylist()))],
        "node_ids": [nodes],
    }, schema=SUMMARY_SCHEMA)


# ------------------------------------------------------------------------------------ inputs


def _sequence_files(path: str) -> list[str]:
    try:
        files = storage.parquet_files(path)
    except FileNotFoundError:
        files = []
    if not files:
        raise GenerationError(f"{path}: no sequences (Parquet) -- run `slim-ray prepare` first")
    return files


def read_sequence_batches(paths: pa.Table):
    """Stream (user_id, item_ids) of Parquet files (local or on storage) in batches of 1024 rows.

    A plain generator task instead of ``read_parquet``: in Ray 2.60 its file-listing task always
    reserves a whole CPU, which deadlocks a 2-core node whose CPUs the engine actors hold."""
    for uri in paths["path"].to_pylist():
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=["user_id", "item_ids"]):
                yield pa.Table.from_batches([rb])


class PartWriter:
    """Ray Data actor around :func:`write_batch` (one process for the whole run)."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_batch(batch, **self.kwargs)


def select_users(files: list[str], num_users: Optional[int], seed: int) -> tuple[Optional[np.ndarray], int]:
    """(the teacher's seeded sample or None for everyone, number of selected users).

    The sample is a prefix of one seeded permutation of the sorted user ids: N=300 contains N=200.
    The driver reads only the user_id column (8 bytes a user).
    """
    ids = []
    for f in files:
        check_columns(storage.parquet_schema(f), SEQUENCES_SCHEMA, f)
        ids.append(storage.read_parquet_file(f, columns=["user_id"])["user_id"].to_numpy())
    all_ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
    if num_users is None or num_users >= len(all_ids):
        return None, len(all_ids)
    perm = np.random.default_rng(seed).permutation(len(all_ids))
    return np.sort(all_ids[perm[:num_users]]), num_users


# ------------------------------------------------------------------------------------ job


def _prepare(cfg, gen: GenerateConfig, role: str, out_name: Optional[str] = None) -> dict[str, Any]:
    """Phase 1 (driver, no Ray): check inputs and model, clean and read the output folder
    (``rationales/<out_name or role>``)."""
    from slim_ray.prompts import load_template
    from slim_ray.prompts.templates import DEFAULT_TEMPLATE

    if gen.role != role:
        raise GenerationError(f"config section for the {role} has role={gen.role!r}")
    if gen.constrain_step3 and gen.engine not in ("hf", "vllm"):
        raise GenerationError(f"{role}.constrain_step3 is implemented for engine=hf and engine=vllm "
                              f"(not {gen.engine}): an OpenAI-compatible endpoint takes no grammar of ours")
    lay = cfg.layout
    seq_files = _sequence_files(lay.sequences)
    for f in seq_files:  # a wrong schema is named here, not from inside the plan task
        check_columns(storage.parquet_schema(f), SEQUENCES_SCHEMA, f)
    if not storage.list_files(lay.items, suffix=".parquet", recursive=True):
        raise GenerationError(f"{lay.items}: no items (Parquet) -- run `slim-ray prepare` first")
    spec = resolve_model(cfg, gen)
    preflight(gen, spec)
    out_dir = storage.normalize(lay.rationales(out_name or role))
    storage.makedirs(out_dir)
    remove_temp_files(out_dir)
    unreadable = drop_unreadable_parts(out_dir)  # before the done set: their rows are generated again
    return dict(seq_files=seq_files, spec=spec, out_dir=out_dir, unreadable_parts=unreadable,
                version=load_template(gen.template or DEFAULT_TEMPLATE[role]).version, run_id=uuid.uuid4().hex[:12])


def resume_plan(seq_files: list[str], num_users: Optional[int], seed: int, out_dir: str):
    """Runs as a Ray task: (sizes, done set, selected users or None). The two arrays have an entry
    per user; they go to the prompt actors as object references and never to the driver."""
    selected, n_selected = select_users(seq_files, num_users, seed)
    done = done_pairs(out_dir)
    return {"n_selected": n_selected, "n_done": int(len(done))}, done, selected


def _plan(p: dict, gen: GenerateConfig, seed: int) -> None:
    """Phase 1b (a Ray task): the teacher's sample and the done set, as object references in ``p``."""
    import ray

    sizes, done_ref, selected_ref = ray.remote(num_returns=3)(resume_plan).remote(
        p["seq_files"], gen.num_users, seed, p["out_dir"])
    p.update(ray.get(sizes), plan_refs=[done_ref, selected_ref])


def _build_dataset(cfg, gen: GenerateConfig, role: str, p: dict, tally):
    """Phase 2: the streaming Ray Data pipeline read -> prompts -> engine -> parts."""
    import ray.data

    spec = p["spec"]
    ds = ray.data.from_items([{"path": f} for f in p["seq_files"]], override_num_blocks=len(p["seq_files"]))
    ds = ds.map_batches(read_sequence_batches, batch_size=1, batch_format="pyarrow", num_cpus=0)
    ds = ds.map_batches(
        PromptStage,
        fn_constructor_kwargs=dict(
            items_path=cfg.layout.items, settings=prompt_settings(cfg, gen), tokenizer=spec.tokenizer,
            plan_refs=p["plan_refs"], model_id=spec.model_id, sampling=sampling_params(gen),
            min_prefix_len=gen.min_prefix_len, tally=tally,
        ),
        batch_size=1024, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gen.num_workers)),
    )
    # One block per engine batch: an engine task turns its whole input block into one output
    # block, so without this a 1024-user prompt block would reach the writer only when all of it
    # is done (coarse progress, and small parts could not be published early).
    ds = small_blocks(ds, gen.batch_size)
    extra = {"items_path": cfg.layout.items} if gen.engine in ("hf", "vllm") else {}  # constrained Step 3's catalog
    ds = APPLY[gen.engine](ds, gen, spec, cfg.seed, p["run_id"], **extra)
    writer_args = dict(out_dir=p["out_dir"], role=role, model=spec.model_id, prompt_version=p["version"],
                       engine=gen.engine, items_path=cfg.layout.items, ground_encoder=gen.ground_encoder,
                       ground_min_cosine=gen.ground_min_cosine)
    part = dict(batch_size=gen.rows_per_file, batch_format="pyarrow", num_cpus=0)
    if gen.engine == "hf":
        # After the hf engine's actors, the writer is one long-lived actor, not a task per part:
        # with every CPU held by the engine replicas, Ray starts (and, idle, kills) a fresh worker
        # process for each task, and on two cores those start-ups took ~40 % of a core away from
        # generation. (After a ray.data.llm processor it stays a task: Ray Data fuses it into the
        # processor's last CPU stage, and as an actor that stage would keep the CPU the engine needs.)
        return ds.map_batches(PartWriter, fn_constructor_kwargs=writer_args,
                              compute=ray.data.ActorPoolStrategy(size=1), **part)
    return ds.map_batches(write_batch, fn_kwargs=writer_args, **part)


def _stream(ds, gen: GenerateConfig, role: str, p: dict) -> dict[str, Any]:
    """Phase 3: run the pipeline, summing the writers' one-row summaries (progress bar)."""
    from tqdm import tqdm

    totals = {"rows": 0, "errors": 0, "prompt_tokens": 0, "output_tokens": 0}
    nodes: set[str] = set()
    t0 = time.time()
    first_row_s = None
    try:
        bar = tqdm(total=max(0, p["n_selected"] - p["n_done"]),
                   desc=f"{storage.basename(p['out_dir'])} rationales ({gen.engine})",
                   unit="row", file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for k in totals:
                totals[k] += int(sum(b[k].to_pylist()))
            for ids in b["node_ids"].to_pylist():
                nodes.update(ids or [])
            if first_row_s is None and totals["rows"]:
                first_row_s = time.time() - t0
            bar.update(int(sum(b["rows"].to_pylist())))
            el = max(time.time() - t0, 1e-9)
            bar.set_postfix(tok_s=f"{totals['output_tokens'] / el:.1f}", failed=totals["errors"], refresh=False)
        bar.close()
    except EngineError:
        raise
    except Exception as e:
        raise GenerationError(
            f"{role} generation failed ({gen.engine}, {p['spec'].path}); the rows written this run "
            f"are kept in {p['out_dir']} and the next run resumes after them. Cause: {type(e).__name__}: {e}"
        ) from e
    return dict(totals, nodes=nodes, seconds=time.time() - t0, first_row_s=first_row_s)


def compact_and_count(out_dir: str, tally, complete: bool) -> tuple[dict, dict, Optional[int]]:
    """Runs as a Ray task: compact the folder to one row per wanted pair (the tally's, when the
    prompt stage saw every selected user) and count it. Returns (compaction, totals, wanted rows)."""
    import ray

    wanted = ray.get(tally.get_wanted.remote()) if complete else None
    compaction = compact(out_dir, wanted)
    return compaction, folder_totals(out_dir, wanted), None if wanted is None else int(len(np.unique(wanted)))


def _finish(gen: GenerateConfig, role: str, p: dict, run: dict, tally) -> dict[str, Any]:
    """Phase 4: compact the folder to one row per wanted pair, count it, build the summary."""
    import ray

    counts, prompt_nodes = ray.get(tally.get.remote())
    seen_users = counts.get("selected", 0) - counts.get("skipped_duplicate", 0)
    complete = seen_users == p["n_selected"]
    if not complete:  # never drop rows on an incomplete picture
        logger.warning("[%s] prompt stage saw %s of %s selected users; keeping rows of other configs",
                       role, seen_users, p["n_selected"])
    compaction, tot, n_wanted = ray.get(ray.remote(num_cpus=0)(compact_and_count).remote(p["out_dir"], tally, complete))
    ray.kill(tally)
    gen_s = run["seconds"]

    def cost(prompt_tokens: int, output_tokens: int) -> float:
        return round(prompt_tokens / 1000 * gen.price_input_per_1k + output_tokens / 1000 * gen.price_output_per_1k, 6)

    n_ok = tot["done_rows"]
    return {
        "role": role, "engine": gen.engine, "model": gen.model, "model_id": p["spec"].model_id,
        "adapter": p["spec"].adapter, "prompt_version": p["version"], "run_id": p["run_id"],
        "rationale_cut": gen.rationale_cut,
        "users_selected": p["n_selected"], "wanted_rows": n_wanted,
        "done_rows": n_ok, "failed_rows": tot["failed_rows"], "missing_rows": tot.get("missing_rows"),
        "skipped_short_prefix": counts.get("skipped_short", 0),
        "skipped_already_done": counts.get("skipped_done", 0),
        "skipped_duplicate": counts.get("skipped_duplicate", 0),
        "generated_rows": run["rows"], "failed_rows_this_run": run["errors"],
        # this attempt (a retried row's tokens count in every attempt that generated it)
        "prompt_tokens": run["prompt_tokens"], "output_tokens": run["output_tokens"],
        "estimated_cost_usd": cost(run["prompt_tokens"], run["output_tokens"]),
        # running totals of the folder: each successful row once, across resumes
        "prompt_tokens_total": tot["prompt_tokens"], "output_tokens_total": tot["output_tokens"],
        "estimated_cost_usd_total": cost(tot["prompt_tokens"], tot["output_tokens"]),
        "price_per_1k": {"input": gen.price_input_per_1k, "output": gen.price_output_per_1k},
        "generation_seconds": round(gen_s, 2),
        "first_row_seconds": round(run["first_row_s"], 2) if run["first_row_s"] else None,
        "rows_per_s": round(run["rows"] / gen_s, 3) if gen_s > 0 else None,
        "output_tokens_per_s": round(run["output_tokens"] / gen_s, 2) if gen_s > 0 else None,
        "compaction": compaction,
        "unreadable_parts_dropped": len(p["unreadable_parts"]),
        "output": {
            "rows": tot["rows"], "failed_rows": tot["failed_rows"],
            "share_all_three_steps": round(tot["all_three_steps"] / n_ok, 4) if n_ok else None,
            "share_recommending_seen_items": round(tot["seen"] / n_ok, 4) if n_ok else None,
            # Step 3 grounded in the catalog: rows naming at least one catalog item, and rows
            # naming an item of the history the rationale was written from (of the successful rows)
            "share_step3_grounded": round(tot["step3_grounded"] / n_ok, 4) if n_ok else None,
            "share_step3_naming_history": round(tot["step3_naming_history"] / n_ok, 4) if n_ok else None,
            "mean_step3_grounded_items": round(tot["step3_items"] / n_ok, 3) if n_ok else None,
            "share_step3_items_in_history": (round(tot["step3_history_items"] / tot["step3_items"], 4)
                                             if tot["step3_items"] else None),
            "mean_output_tokens": round(tot["output_tokens"] / n_ok, 1) if n_ok else None,
        },
        # nodes that generated the folder's rows (across resumes), and those that worked this attempt
        "node_ids": sorted(set(tot["node_ids"]) | set(prompt_nodes) | run["nodes"]),
        "node_ids_this_run": sorted(set(prompt_nodes) | run["nodes"]),
        "out": p["out_dir"],
    }


def run_generation(cfg, gen: GenerateConfig, role: str, out_name: Optional[str] = None) -> dict[str, Any]:
    """One resumable generation attempt into ``rationales/<out_name or role>``. Rows that fail
    (``error`` set) are kept as error rows and counted in ``failed_rows``; the stage itself only
    fails when the engine cannot run at all."""
    from slim_ray.runtime import init_ray

    t_start = time.time()
    p = _prepare(cfg, gen, role, out_name)
    init_ray(cfg.ray)
    _plan(p, gen, cfg.seed)
    tally = _tally_cls().remote()
    ds = _build_dataset(cfg, gen, role, p, tally)
    run = _stream(ds, gen, role, p)
    summary = _finish(gen, role, p, run, tally)
    summary["seconds_total"] = round(time.time() - t_start, 2)
    logger.warning("[%s] %s", role, json.dumps({k: summary[k] for k in (
        "generated_rows", "done_rows", "failed_rows", "skipped_already_done", "skipped_short_prefix",
        "output_tokens_per_s", "estimated_cost_usd_total")}))
    return summary
