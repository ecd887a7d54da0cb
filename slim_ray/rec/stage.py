"""``slim-ray train`` and ``slim-ray evaluate``.

``run_train`` trains the sweep ``rec.backbone x rec.mode x rec.seeds`` (each a list or a single
value), one Ray Train ``TorchTrainer`` per run, into ``rec/<backbone>-<mode>[-<role>]-s<seed>/``.
A run folder whose ``meta.json`` carries the same settings fingerprint is skipped (resumable
sweep); a variant whose rationale vectors are missing fails with a message naming the users.
``run_evaluate`` scores every finished run on the test target in user shards (Ray tasks) and writes
``eval/metrics.json``, ``eval/per_user/`` and ``eval/candidates/`` (slim_ray/rec/evaluate.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


def run_train(cfg) -> dict[str, Any]:
    from slim_ray import storage
    from slim_ray.rec.checkpoint import META, read_meta
    from slim_ray.rec.ingest import resolve_ingest
    from slim_ray.rec.train import fit_sweep, is_done, run_spec
    from slim_ray.runtime import init_ray

    ingest = resolve_ingest(cfg.rec.ingest, cfg.rec.ingest_min_users, cfg.layout.sequences, cfg.rec.max_users)
    specs = []
    for b, m, r, s, p in cfg.rec.runs():  # resolve every spec first: a bad param fails before any training
        specs.append((run_spec(cfg, b, m, r, s, p, ingest), cfg.layout.rec_run(b, m, s, r, p)))
    _check_inputs(specs)
    todo = [(s, d) for s, d in specs if cfg.rec.force or not is_done(d, s["fingerprint"])]
    if cfg.rec.force:
        for _, d in todo:
            storage.delete_file(storage.join(d, META))
    summary: dict[str, Any] = {"runs": {}, "trained": len(todo), "skipped": len(specs) - len(todo), "ingest": ingest}
    t0 = time.time()
    if todo:
        init_ray(cfg.ray)
        logger.warning("[train] %d run(s) to train, %d already done", len(todo), len(specs) - len(todo))
        fit_sweep(cfg, todo)
    trained = {d for _, d in todo}
    nodes: set[str] = set()
    for spec, run_dir in specs:
        meta = read_meta(run_dir)
        if meta is None:
            raise FileNotFoundError(f"{run_dir}: training ended without publishing {META}")
        if run_dir in trained:
            nodes.update(meta.get("node_ids") or [])
        tag = storage.basename(run_dir)
        summary["runs"][tag] = {"best_epoch": meta["best_epoch"], "valid_ndcg@10": round(meta["best_valid_ndcg@10"], 4),
                                "epochs": len(meta["epoch_seconds"]), "seconds": meta["wall_seconds"],
                                "fallback_users": meta["fallback_users"],
                                "rationale_protocol": meta.get("rationale_protocol"), "loss": meta.get("loss")}
        logger.warning("[train] %s: valid NDCG@10 %.4f at epoch %d (%d epochs, %.0fs)", tag,
                       meta["best_valid_ndcg@10"], meta["best_epoch"], len(meta["epoch_seconds"]), meta["wall_seconds"])
    summary["node_ids"] = sorted(nodes)  # the Train workers' nodes of the runs trained by this call
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _check_inputs(specs) -> None:
    """Fail before starting Ray when an input folder is missing (names the folder and the fix)."""
    from slim_ray import storage

    for spec, _ in specs:
        for key, fix in (("sequences", "slim-ray prepare"), ("item_embeddings", "slim-ray encode"),
                         ("user_embeddings", "slim-ray encode (after teach/reason)"),
                         ("rationales", "slim-ray teach / reason, or set rec.rationale_protocol=leaky")):
            path = spec.get(key)
            if path and not storage.exists(path):
                raise FileNotFoundError(f"{path}: missing input of rec run {spec['backbone']}/{spec['variant']} "
                                        f"(run `{fix}` first)")
        # under rec.ingest=dataset the user-state task checks this, without reading users here
        if spec.get("user_embeddings") and spec["missing_rationale"] == "error" and spec.get("ingest") != "dataset":
            from slim_ray.rec.data import user_text_table
            from slim_ray.rec.train import load_data

            data = load_data(spec)  # raises MissingRationales naming how many users and the first ids
            user_text_table(spec["user_embeddings"], data.user_ids, data.n_users, "error")


def run_evaluate(cfg) -> dict[str, Any]:
    from slim_ray.rec.evaluate import evaluate_all, format_table

    out, info = evaluate_all(cfg)
    print(format_table(out), flush=True)
    return {
        "runs": sum(len(e["runs"]) for v in out["results"].values() for e in v.values()),
        "variants": {bb: sorted(v) for bb, v in out["results"].items()},
        "num_users": out["num_users"],
        "shards": info["shards"],
        "per_user_rows": info["per_user_rows"],
        "candidates_reused": bool((out.get("sampled") or {}).get("reused")),
        "node_ids": info["node_ids"],  # the nodes the shard tasks ran on
    }
