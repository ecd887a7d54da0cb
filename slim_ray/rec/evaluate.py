"""Test metrics of every finished run, aggregated over seeds, with a significance test.

Candidates for the sampled protocol are drawn ONCE per run folder (seeded) and stored in
``eval/candidates.parquet`` (user_id, target, negatives): every model, seed and later evaluation
faces the same 100 negatives per user. They are redrawn only when the sequences, the number of
negatives or the seed change (recorded in the file's metadata).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from slim_ray import storage
from slim_ray.rec import data as rd
from slim_ray.rec.checkpoint import finished_runs, load_run, read_meta
from slim_ray.rec.metrics import evaluate_vectors, mean_metrics, metric_names, paired_test, random_reference


def _sequences_digest(data: rd.RecData) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(data.user_ids).tobytes())
    for s in data.seqs:
        h.update(np.int64(len(s)).tobytes())
        h.update(s.tobytes())
    h.update(np.int64(data.n_items).tobytes())
    return h.hexdigest()[:16]


def draw_candidates(data: rd.RecData, num_negatives: int, seed: int) -> np.ndarray:
    """[U, 1 + num_negatives]: test target, then negatives uniformly drawn without replacement
    from the items NOT in the user's whole sequence (rejection sampling; vectorised per round)."""
    rng = np.random.default_rng(seed)
    U, N = len(data), data.n_items
    out = np.zeros((U, 1 + num_negatives), dtype=np.int64)
    for i, s in enumerate(data.seqs):
        seen = np.unique(s)
        free = N - len(seen)
        if free < num_negatives:
            raise ValueError(f"user_id {int(data.user_ids[i])}: only {free} unseen items, "
                             f"cannot draw {num_negatives} negatives")
        got = np.zeros(0, dtype=np.int64)
        while len(got) < num_negatives:
            draw = rng.integers(1, N + 1, size=2 * num_negatives)
            draw = draw[~np.isin(draw, seen)]
            got = np.concatenate([got, draw])
            _, first = np.unique(got, return_index=True)
            got = got[np.sort(first)]
        out[i, 0] = s[-1]
        out[i, 1:] = got[:num_negatives]
    return out


def stored_candidates(path: str, data: rd.RecData, num_negatives: int, seed: int) -> tuple[np.ndarray, bool]:
    """Load ``path`` if it was drawn for the same sequences/negatives/seed; else draw and store.
    Returns (candidates, reused)."""
    key = {"sequences": _sequences_digest(data), "num_negatives": num_negatives, "seed": seed}
    if storage.is_file(path):
        t = storage.read_parquet_file(path)
        meta = json.loads((t.schema.metadata or {}).get(b"slim_ray", b"{}"))
        if meta == key and t.num_rows == len(data):
            negs = np.asarray(t.column("negatives").to_pylist(), dtype=np.int64)
            cand = np.concatenate([t.column("target").to_numpy()[:, None], negs], 1)
            order = np.argsort(t.column("user_id").to_numpy())
            return cand[order], True
    cand = draw_candidates(data, num_negatives, seed)
    t = pa.table({
        "user_id": pa.array(data.user_ids, pa.int64()),
        "target": pa.array(cand[:, 0], pa.int64()),
        "negatives": pa.array(list(cand[:, 1:]), pa.list_(pa.int64())),
    }).replace_schema_metadata({"slim_ray": json.dumps(key)})
    storage.write_table(t, path)
    return cand, False


def evaluate_run(run_dir: str, data: rd.RecData, candidates: Optional[np.ndarray], ks, batch_users: int):
    """(per-user metrics {"full"|"sampled": {metric: [U]}}, meta) of one finished run on the test target."""
    import torch

    model, meta = load_run(run_dir)
    split = rd.eval_split(data, "test", int(meta["hp"]["max_len"]))
    with torch.no_grad():
        table = model.item_table()
        vecs = []
        for s in range(0, len(split.users), batch_users):
            sl = slice(s, s + batch_users)
            vecs.append(model.last_user_vectors(torch.as_tensor(split.seq[sl]), torch.as_tensor(split.lens[sl]),
                                                torch.as_tensor(split.users[sl]), table))
        per_user = evaluate_vectors(torch.cat(vecs), table, split, ks, candidates, batch_users)
    return per_user, meta, split


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def evaluate_all(cfg) -> dict[str, Any]:
    """Evaluate every finished run under ``rec/`` that matches the sequences; write metrics.json."""
    ec = cfg.evaluate
    lay = cfg.layout
    storage.makedirs(lay.eval)
    runs = finished_runs(lay.rec)
    if not runs:
        raise FileNotFoundError(f"{lay.rec}: no finished runs (run `slim-ray train` first)")
    n_items = rd.count_items(lay.items)
    full_data = rd.load_sequences(lay.sequences, None, n_items)
    ks = list(ec.ks)
    cand_all, reused = None, False
    if "sampled" in ec.protocols:
        cand_all, reused = stored_candidates(storage.join(lay.eval, "candidates.parquet"), full_data,
                                             ec.num_negatives, ec.candidates_seed)
    groups = _evaluate_runs(cfg, runs, full_data, cand_all, n_items, ks)
    results = _aggregate(groups, ec.protocols, metric_names(ks))
    out = {
        "description": "see docs/rec.md#metricsjson",
        "ks": ks, "metrics": metric_names(ks), "protocols": list(ec.protocols),
        "num_users": len(full_data), "num_items": full_data.n_items,
        "sampled": {"num_negatives": ec.num_negatives, "seed": ec.candidates_seed,
                    "candidates": "eval/candidates.parquet", "reused": reused} if cand_all is not None else None,
        "random": _random_reference(full_data, ec, ks),
        "results": results,
        "significance": _significance(groups, results, ec),
    }
    storage.write_json(storage.join(lay.eval, "metrics.json"), out)
    return out


def _evaluate_runs(cfg, runs, full_data, cand_all, n_items, ks) -> dict[tuple[str, str], list]:
    """Phase 1: per-user metrics of every run, grouped by (backbone, variant)."""
    ec, lay = cfg.evaluate, cfg.layout
    groups: dict[tuple[str, str], list] = {}
    for run_dir in runs:
        mu = (read_meta(run_dir) or {}).get("max_users")
        data = full_data if mu is None else rd.load_sequences(lay.sequences, mu, n_items)
        cand = None if cand_all is None else cand_all[: len(data)]
        per_user, meta, split = evaluate_run(run_dir, data, cand, ks, ec.batch_users)
        per_user = {p: v for p, v in per_user.items() if p in ec.protocols}
        groups.setdefault((meta["backbone"], meta["variant"]), []).append((meta, per_user, split, storage.basename(run_dir)))
    return groups


def _aggregate(groups, protocols, names) -> dict[str, Any]:
    """Phase 2: per seed, mean and std over seeds of every (backbone, variant)."""
    results: dict[str, Any] = {}
    for (bb, var), items in sorted(groups.items()):
        items.sort(key=lambda x: x[0]["seed"])
        entry: dict[str, Any] = {"runs": [f"rec/{x[3]}" for x in items], "seeds": [x[0]["seed"] for x in items],
                                 "per_seed": {}, "mean": {}, "std": {},
                                 "fallback_users": [x[0].get("fallback_users", 0) for x in items],
                                 "best_epoch": [x[0].get("best_epoch") for x in items],
                                 "train_seconds": [x[0].get("wall_seconds") for x in items],
                                 "mean_epoch_seconds": [float(np.mean(x[0]["epoch_seconds"])) if x[0].get("epoch_seconds") else None for x in items],
                                 "n_users": int(len(items[0][2].users))}
        for meta, per_user, _, _ in items:
            entry["per_seed"][str(meta["seed"])] = {p: mean_metrics(v) for p, v in per_user.items()}
        for p in protocols:
            entry["mean"][p], entry["std"][p] = {}, {}
            for m in names:
                mean, std = _stats([entry["per_seed"][str(x[0]["seed"])][p][m] for x in items])
                entry["mean"][p][m], entry["std"][p][m] = mean, std
        results.setdefault(bb, {})[var] = entry
    return results


def _random_reference(full_data, ec, ks) -> dict[str, Any]:
    """Exact expectations of a random ranker for these candidate counts."""
    ref = {}
    if "sampled" in ec.protocols:
        ref["sampled"] = random_reference(np.full(len(full_data), 1 + ec.num_negatives), ks)
    if "full" in ec.protocols:
        ref["full"] = random_reference(rd.eval_split(full_data, "test", 1).n_candidates, ks)
    return ref


def _significance(groups, results, ec) -> dict[str, Any]:
    """Paired test of each SLIM/text variant against the better (by mean) of id / id_text, on the
    per-user metric averaged over the seeds both have."""
    metric = ec.significance_metric
    significance: dict[str, Any] = {}
    for bb, variants in groups_by_backbone(groups).items():
        base_names = [v for v in ("id", "id_text") if v in variants]
        if not base_names:
            continue
        for var, items in variants.items():
            if var in ("id", "id_text"):
                continue
            for p in ec.protocols:
                best = max(base_names, key=lambda v: results[bb][v]["mean"][p][metric])
                a = _per_user_mean(items, p, metric)
                b = _per_user_mean(variants[best], p, metric)
                if a is None or b is None or len(a) != len(b):
                    continue
                significance.setdefault(bb, {}).setdefault(var, {})[p] = {
                    "baseline": best, "metric": metric, **paired_test(a, b)}
    return significance


def groups_by_backbone(groups):
    out: dict[str, dict[str, list]] = {}
    for (bb, var), items in groups.items():
        out.setdefault(bb, {})[var] = items
    return out


def _per_user_mean(items, protocol: str, metric: str) -> Optional[np.ndarray]:
    arrs = [x[1][protocol][metric] for x in items if protocol in x[1]]
    if not arrs or len({len(a) for a in arrs}) != 1:
        return None
    return np.mean(arrs, axis=0)


def format_table(metrics: dict[str, Any], cols=("ndcg@10", "hr@10", "hr@20")) -> str:
    """A Markdown table (mean +- std over seeds, in %) of metrics.json."""
    prots = metrics["protocols"]
    head = "| backbone | variant | seeds | " + " | ".join(f"{p} {c}" for p in prots for c in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(prots) * len(cols))]
    for bb, variants in metrics["results"].items():
        for var, e in variants.items():
            cells = [f"{100 * e['mean'][p][c]:.2f} ± {100 * e['std'][p][c]:.2f}" for p in prots for c in cols]
            lines.append(f"| {bb} | {var} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    rr = metrics.get("random") or {}
    if rr:
        cells = [f"{100 * rr[p][c]:.2f}" if p in rr else "" for p in prots for c in cols]
        lines.append("| random | (expected) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)
