"""Test metrics of every finished run, evaluated in user shards, aggregated from per-shard sums.

The driver holds configs, counts and sums, never an array with one entry per user (DESIGN.md §9):

1. ``plan_shards``: the row groups of the ``sequences`` parts, read from the Parquet footers and
   grouped up to ``shard_users`` rows per shard.
2. One Ray task per shard (``evaluate_shard``) reads its users, gets their sampled-protocol
   candidates, scores every finished run on the test target (``load_run``, cached per worker
   process), writes the per-user metric rows to ``eval/per_user/part-<shard>.parquet`` and returns
   sums: per run and protocol the sum of every metric, the paired sums of each variant against each
   baseline, the random ranker's expectations.
3. The driver adds the sums up: means per run, mean and std over seeds, the paired t-test from the
   sums of d and d^2. The Wilcoxon signed-rank test needs every user's pair of values, so it is
   computed only when the compared runs have at most ``WILCOXON_MAX_USERS`` users (read back from
   ``eval/per_user``); above it, ``p_wilcoxon`` is null with the reason.

Candidates (the target, then ``num_negatives`` items not in the user's whole sequence) are drawn per
user from ``np.random.default_rng([seed, user_id])``, so a user's negatives do not depend on how
users are sharded. They are stored as a dataset, ``eval/candidates/part-<shard>.parquet`` (user_id,
target, negatives), with ``eval/candidates/key.json`` written last: the sequences' identity (the
prepare stage's fingerprint and the parts' names, sizes and times), the number of items, negatives,
the seed and the shard plan. While the key matches, every evaluation reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from slim_ray import storage
from slim_ray.rec import data as rd
from slim_ray.rec.checkpoint import MODEL, finished_runs, load_run, read_meta
from slim_ray.rec.config import FULL_PREFIX_VARIANT, base_role, full_prefix_role
from slim_ray.rec.metrics import (
    add_paired_sums, evaluate_vectors, metric_names, paired_sums, paired_test_from_sums, random_reference, wilcoxon_p,
)

logger = logging.getLogger(__name__)

SHARD_USERS = 100_000  # users per shard at most (whole row groups; a larger row group is one shard)
WILCOXON_MAX_USERS = 200_000  # above it the driver does not read per-user columns: no Wilcoxon test
RUN_CACHE_SIZE = 8  # loaded runs kept per worker process
CANDIDATES = "candidates"
PER_USER = "per_user"
KEY_FILE = "key.json"
DRAW = "default_rng([seed, user_id]); uniform over unseen items, rejection sampling, first distinct"
BASELINES = ("id", "id_text")


# --------------------------------------------------------------------------- candidates


def draw_user_negatives(seq: np.ndarray, n_items: int, num_negatives: int, seed: int, user_id: int) -> np.ndarray:
    """``num_negatives`` distinct items in 1..n_items not in ``seq``, uniformly drawn from the
    user's own generator ``default_rng([seed, user_id])`` (rejection sampling, vectorised per round)."""
    seen = np.unique(seq)
    free = n_items - len(seen)
    if free < num_negatives:
        raise ValueError(f"user_id {int(user_id)}: only {free} unseen items, cannot draw {num_negatives} negatives")
    rng = np.random.default_rng([int(seed), int(user_id)])
    got = np.zeros(0, dtype=np.int64)
    while len(got) < num_negatives:
        draw = rng.integers(1, n_items + 1, size=2 * num_negatives)
        got = np.concatenate([got, draw[~np.isin(draw, seen)]])
        _, first = np.unique(got, return_index=True)
        got = got[np.sort(first)]
    return got[:num_negatives]


def draw_candidates(data: rd.RecData, num_negatives: int, seed: int) -> np.ndarray:
    """[U, 1 + num_negatives]: each user's test target, then its negatives (``draw_user_negatives``)."""
    out = np.zeros((len(data), 1 + num_negatives), dtype=np.int64)
    for i, (u, s) in enumerate(zip(data.user_ids, data.seqs)):
        out[i, 0] = s[-1]
        out[i, 1:] = draw_user_negatives(s, data.n_items, num_negatives, seed, u)
    return out


def candidates_table(user_ids: np.ndarray, cand: np.ndarray) -> pa.Table:
    k = cand.shape[1] - 1
    negs = pa.ListArray.from_arrays(pa.array(np.arange(len(cand) + 1) * k, pa.int32()),
                                    pa.array(cand[:, 1:].reshape(-1), pa.int64()))
    return pa.table({"user_id": pa.array(user_ids, pa.int64()), "target": pa.array(cand[:, 0], pa.int64()),
                     "negatives": negs})


def read_candidates(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids [U], candidates [U, 1 + n]) of one candidates part, in its row order."""
    t = storage.read_parquet_file(path)
    users = t.column("user_id").to_numpy()
    if not len(users):
        return users, np.zeros((0, 1), dtype=np.int64)
    negs = t.column("negatives").combine_chunks()
    flat = negs.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(users), -1)
    return users, np.concatenate([t.column("target").to_numpy()[:, None], flat], 1)


def sequences_identity(lay) -> str:
    """Identity of the sequences without reading a row: the prepare stage's fingerprint (when its
    manifest says complete) and the names, sizes and modification times of the parts."""
    from slim_ray.lineage import CONFIG, MANIFEST, read_manifest

    m = read_manifest(lay.prepared)
    stage = m.get("fingerprint") if m and m.get("status") == "complete" else None
    parts = storage.tree_listing(lay.sequences, skip=(MANIFEST, CONFIG))
    return hashlib.sha256(json.dumps({"prepare": stage, "parts": parts}).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- shards


def plan_shards(sequences: str, shard_users: int = SHARD_USERS) -> list[dict[str, Any]]:
    """Shards of the sequences contract: consecutive row groups of one part, up to ``shard_users``
    rows each. ``id`` (part index, first row group) names the shard's output parts."""
    shards = []
    for i, (part, groups) in enumerate(rd.sequence_row_groups(sequences)):
        chosen: list[int] = []
        rows = 0
        for g, n in enumerate(groups):
            if chosen and rows + n > shard_users:
                shards.append({"id": f"{i:05d}-{chosen[0]:05d}", "part": part, "row_groups": chosen, "rows": rows})
                chosen, rows = [], 0
            chosen.append(g)
            rows += n
        if chosen:
            shards.append({"id": f"{i:05d}-{chosen[0]:05d}", "part": part, "row_groups": chosen, "rows": rows})
    return shards


_RUNS: "OrderedDict[tuple, tuple]" = OrderedDict()


def with_user_table(model, user_embeddings: str):
    """The run's model reading another rationale set (``embeddings/<role>-full/``): its per-user
    table is replaced, users without a vector there take the run's missing-rationale fallback."""
    import torch

    table, has, _ = rd.user_text_table(user_embeddings, np.zeros(0, np.int64), model.user_text.shape[0] - 1, "zeros")
    if table.shape[1] != model.user_text.shape[1]:
        raise ValueError(f"{user_embeddings}: {table.shape[1]}-d vectors, the run was trained on "
                         f"{model.user_text.shape[1]}-d ones (encode both sets with one encoder)")
    model.pop_user_table()
    model.put_user_table(torch.from_numpy(table), torch.from_numpy(has))
    return model


def cached_run(run_dir: str, user_embeddings: Optional[str] = None):
    """``load_run`` once per worker process and run version (model.pt's size and time), with the
    per-user table of ``user_embeddings`` when given (``evaluate.rationales: full_prefix``)."""
    fi = storage.info(storage.join(run_dir, MODEL))
    key = (storage.normalize(run_dir), fi.size, fi.mtime_ns, user_embeddings)
    if key in _RUNS:
        _RUNS.move_to_end(key)
        return _RUNS[key]
    model, meta = load_run(run_dir)
    _RUNS[key] = (with_user_table(model, user_embeddings) if user_embeddings else model), meta
    while len(_RUNS) > RUN_CACHE_SIZE:
        _RUNS.popitem(last=False)
    return _RUNS[key]


def user_metrics(model, meta, data: rd.RecData, candidates: Optional[np.ndarray], ks, batch_users: int):
    """Per-user metrics {"full"|"sampled": {metric: [U]}} of a loaded run on the test target."""
    import torch

    split = rd.eval_split(data, "test", int(meta["hp"]["max_len"]))
    with torch.no_grad():
        table = model.item_table()
        vecs = []
        for s in range(0, len(split.users), batch_users):
            sl = slice(s, s + batch_users)
            vecs.append(model.last_user_vectors(torch.as_tensor(split.seq[sl]), torch.as_tensor(split.lens[sl]),
                                                torch.as_tensor(split.users[sl]), table))
        return evaluate_vectors(torch.cat(vecs), table, split, ks, candidates, batch_users)


def evaluate_run(run_dir: str, data: rd.RecData, candidates: Optional[np.ndarray], ks, batch_users: int):
    """(per-user metrics, meta) of one finished run on every user of ``data``, in one process
    (the reference the sharded evaluation is tested against)."""
    model, meta = load_run(run_dir)
    return user_metrics(model, meta, data, candidates, ks, batch_users), meta


def _subset(data: rd.RecData, n: int) -> rd.RecData:
    return rd.RecData(data.user_ids[:n], data.seqs[:n], data.n_items, int(data.user_ids[n - 1]) if n else 0)


def _shard_candidates(shard: dict[str, Any], data: rd.RecData, job: dict[str, Any]) -> tuple[np.ndarray, Optional[str]]:
    """(candidates of the shard's users, name of the part written or None when reused)."""
    c = job["candidates"]
    name = f"part-{shard['id']}.parquet"
    path = storage.join(c["dir"], name)
    if c["reuse"]:
        users, cand = read_candidates(path)
        if not np.array_equal(users, data.user_ids) or cand.shape[1] != 1 + c["num_negatives"]:
            raise ValueError(f"{path}: stored candidates do not match the users of shard {shard['id']} "
                             f"(delete {c['dir']} to draw them again)")
        return cand, None
    cand = draw_candidates(data, c["num_negatives"], c["seed"])
    storage.write_table(candidates_table(data.user_ids, cand), path)
    return cand, name


def _per_user_table(users: np.ndarray, run: dict[str, Any], protocol: str, per_user: dict[str, np.ndarray]) -> pa.Table:
    n = len(users)
    cols = {"user_id": pa.array(users, pa.int64()),
            "run": pa.array([run["tag"]] * n, pa.string()),
            "backbone": pa.array([run["backbone"]] * n, pa.string()),
            "variant": pa.array([run["variant"]] * n, pa.string()),
            "seed": pa.array(np.full(n, run["seed"]), pa.int64()),
            "protocol": pa.array([protocol] * n, pa.string())}
    cols.update({m: pa.array(v, pa.float64()) for m, v in per_user.items()})
    return pa.table(cols)


def evaluate_shard(shard: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every run of ``job`` on one shard of users (runs in a Ray task). Writes the shard's
    candidates part (unless reused) and per-user rows; returns sums and counts only."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    ks, protocols, metric = job["ks"], job["protocols"], job["significance_metric"]
    data = rd.load_sequence_shard(shard["part"], shard["row_groups"], job["n_items"])
    out: dict[str, Any] = {"shard": shard["id"], "node_id": node, "users": len(data), "runs": {},
                           "random": {}, "pairs": {}, "rows": 0, "candidates_part": None}
    if not len(data):
        return out
    cand = None
    if "sampled" in protocols:
        cand, out["candidates_part"] = _shard_candidates(shard, data, job)
        out["random"]["sampled"] = _sums(random_reference(np.full(len(data), cand.shape[1]), ks), len(data))
    if "full" in protocols:
        out["random"]["full"] = _sums(random_reference(rd.eval_split(data, "test", 1).n_candidates, ks), len(data))
    tables, sig = [], {}
    for run in job["runs"]:
        # users are sorted by id, so a run trained on the first max_users users scores a prefix
        n = len(data) if run["cutoff"] is None else int(np.searchsorted(data.user_ids, run["cutoff"], "right"))
        if n == 0:
            out["runs"][run["tag"]] = {"n": 0, "sums": {}}
            continue
        model, meta = cached_run(run["dir"], run.get("user_embeddings"))
        per_user = user_metrics(model, meta, _subset(data, n), None if cand is None else cand[:n], ks,
                                job["batch_users"])
        out["runs"][run["tag"]] = {"n": n, "sums": {p: {m: float(v.sum()) for m, v in per_user[p].items()}
                                                    for p in protocols}}
        for p in protocols:
            tables.append(_per_user_table(data.user_ids[:n], run, p, per_user[p]))
        sig[run["tag"]] = {p: per_user[p][metric] for p in protocols}
    for pair in job["pairs"]:
        a = [sig[t][pair["protocol"]] for t in pair["a"] if t in sig]
        b = [sig[t][pair["protocol"]] for t in pair["b"] if t in sig]
        if a and b:  # every run of a pair scores the same users (same cutoff)
            out["pairs"][pair["key"]] = paired_sums(np.mean(a, axis=0), np.mean(b, axis=0))
    if tables:
        t = pa.concat_tables(tables)
        storage.write_table(t, storage.join(job["per_user_dir"], f"part-{shard['id']}.parquet"))
        out["rows"] = t.num_rows
    return out


def _sums(means: dict[str, float], n: int) -> dict[str, float]:
    return {m: v * n for m, v in means.items()}


def scan_shard(shard: dict[str, Any], n_items: Optional[int], smallest: int) -> dict[str, Any]:
    """Users, largest item id and the ``smallest`` lowest user ids of a shard (runs in a Ray task):
    what the driver needs for ``rec.max_users`` runs and a run folder without an items contract."""
    data = rd.load_sequence_shard(shard["part"], shard["row_groups"], n_items)
    return {"users": len(data), "max_item": max((int(s.max()) for s in data.seqs), default=0),
            "smallest": data.user_ids[:smallest].tolist()}


# --------------------------------------------------------------------------- driver


def _ray_get(refs):
    """ray.get, re-raising our own input errors without Ray's wrapping."""
    import ray

    from slim_ray.errors import find_error

    try:
        return ray.get(refs)
    except Exception as e:
        for cls in (ValueError, FileNotFoundError):
            err = find_error(e, cls)
            if err is not None:
                raise err from e
        raise


def _run_records(runs: list[str], cutoffs: dict[int, Optional[int]]) -> list[dict[str, Any]]:
    recs = []
    for r in runs:
        meta = read_meta(r)
        mu = meta.get("max_users")
        recs.append({"dir": r, "tag": storage.basename(r), "backbone": meta["backbone"], "variant": meta["variant"],
                     "seed": int(meta["seed"]), "cutoff": cutoffs.get(mu) if mu else None, "meta": meta})
    return recs


def _full_prefix_records(records, lay) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Each consistent-protocol rationale run again, reading the rationale written from the whole
    training prefix (``embeddings/<role>-full/``): variant ``<variant>+full``, run tag ``<tag>+full``.
    Per-step runs (``<role>-step<k>``) have no such set and are left out. A role without the set is
    skipped and returned as {role: missing folder} (metrics.json names it); none at all is an error."""
    out, found, missing = [], {}, {}  # role -> its set's folder, listed once per role
    for r in records:
        role, proto = r["meta"].get("role"), r["meta"].get("rationale_protocol")
        if not role or proto != "consistent" or role != base_role(role):
            continue
        if role not in found and role not in missing:
            path = storage.normalize(lay.user_embeddings(full_prefix_role(role)))
            (found if storage.list_files(path, suffix=".parquet", recursive=True) else missing)[role] = path
        if role in found:
            out.append({**r, "tag": r["tag"] + FULL_PREFIX_VARIANT, "variant": r["variant"] + FULL_PREFIX_VARIANT,
                        "user_embeddings": found[role]})
    if missing and not found:
        role = sorted(missing)[0]
        raise FileNotFoundError(
            f"{missing[role]}: no rationale vectors, needed by evaluate.rationales=full_prefix "
            f"(generate them with {role}.eval_rationale=full_prefix, then encode with encode.roles "
            f"including {full_prefix_role(role)})")
    for role, path in sorted(missing.items()):
        logger.warning("[evaluate] %s: no full-prefix rationale vectors; the %s runs are scored with their "
                       "cut rationale only", path, role)
    return out, missing


def _scan(shards, runs: list[str], n_items: Optional[int]) -> tuple[Optional[int], dict[int, Optional[int]]]:
    """(number of items, {max_users: largest user id a run with that max_users was trained on}).
    Only run when a run sets max_users (smoke runs: at most max_users ids per shard reach the
    driver) or the items contract is missing."""
    import ray

    wanted = sorted({int(m["max_users"]) for m in map(read_meta, runs) if m.get("max_users")})
    if n_items is not None and not wanted:
        return n_items, {}
    k = max(wanted, default=0)
    task = ray.remote(num_cpus=1)(scan_shard)
    res = _ray_get([task.remote(s, n_items, k) for s in shards])
    if n_items is None:
        n_items = max(r["max_item"] for r in res)
    ids = np.sort(np.concatenate([np.asarray(r["smallest"], dtype=np.int64) for r in res]))
    return n_items, {mu: (int(ids[mu - 1]) if len(ids) >= mu else None) for mu in wanted}


def _pairs(records, protocols) -> list[dict[str, Any]]:
    """Each (variant, baseline, protocol) the shards compute paired sums for: every non-baseline
    variant against each baseline of its backbone whose runs scored the same users."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        groups.setdefault((r["backbone"], r["variant"]), []).append(r)
    pairs = []
    for (bb, var), items in sorted(groups.items()):
        if var in BASELINES:
            continue
        for base in BASELINES:
            base_items = groups.get((bb, base))
            if not base_items or len({r["cutoff"] for r in items + base_items}) != 1:
                continue
            for p in protocols:
                pairs.append({"key": f"{bb}|{var}|{base}|{p}", "protocol": p, "a": [r["tag"] for r in items],
                              "b": [r["tag"] for r in base_items]})
    return pairs


def _prepare_candidates(cfg, shards, n_items: int) -> dict[str, Any]:
    """The candidates job entry: reuse the stored dataset when its key matches, else clear it."""
    ec, lay = cfg.evaluate, cfg.layout
    if ec.candidates_seed < 0:
        raise ValueError(f"evaluate.candidates_seed={ec.candidates_seed}: must be >= 0 (it seeds each user's generator)")
    folder = storage.join(lay.eval, CANDIDATES)
    key = {"sequences": sequences_identity(lay), "n_items": n_items, "num_negatives": ec.num_negatives,
           "seed": ec.candidates_seed, "draw": DRAW,
           "shards": [[storage.basename(s["part"]), s["row_groups"]] for s in shards]}
    stored = storage.read_json(storage.join(folder, KEY_FILE)) or {}
    present = {storage.basename(f) for f in storage.list_files(folder, suffix=".parquet")}
    reuse = stored.get("key") == key and set(stored.get("parts", [])) <= present
    if not reuse:
        storage.delete_dir(folder)
    return {"dir": folder, "reuse": reuse, "num_negatives": ec.num_negatives, "seed": ec.candidates_seed, "key": key}


def evaluate_all(cfg, shard_users: int = SHARD_USERS,
                 wilcoxon_max_users: int = WILCOXON_MAX_USERS) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate every finished run under ``rec/`` in user shards and write metrics.json.
    Returns (metrics.json's content, {node_ids of the shard tasks, shards, per-user rows})."""
    import ray

    from slim_ray.runtime import init_ray

    ec, lay = cfg.evaluate, cfg.layout
    ks, protocols = list(ec.ks), list(ec.protocols)
    if ec.significance_metric not in metric_names(ks):
        raise ValueError(f"evaluate.significance_metric={ec.significance_metric!r} is not one of the metrics "
                         f"of evaluate.ks: {', '.join(metric_names(ks))}")
    runs = finished_runs(lay.rec)
    if not runs:
        raise FileNotFoundError(f"{lay.rec}: no finished runs (run `slim-ray train` first)")
    storage.makedirs(lay.eval)
    shards = plan_shards(lay.sequences, shard_users)
    if not shards:
        raise ValueError(f"{lay.sequences}: no rows (run `slim-ray prepare` first)")
    init_ray(cfg.ray)
    n_items, cutoffs = _scan(shards, runs, rd.count_items(lay.items))
    records = _run_records(runs, cutoffs)
    full_missing: dict[str, str] = {}
    if "full_prefix" in ec.rationales:
        full, full_missing = _full_prefix_records(records, lay)
        if "cut" not in ec.rationales:  # only the full-prefix reading of those runs
            cut_tags = {r["tag"][:-len(FULL_PREFIX_VARIANT)] for r in full}
            records = [r for r in records if r["tag"] not in cut_tags]
        records += full
    cand = _prepare_candidates(cfg, shards, n_items) if "sampled" in protocols else None
    per_user_dir = storage.join(lay.eval, PER_USER)
    storage.delete_dir(per_user_dir)
    storage.delete_file(storage.join(lay.eval, "candidates.parquet"))  # the single file of older versions
    job = {"n_items": n_items, "ks": ks, "protocols": protocols, "significance_metric": ec.significance_metric,
           "batch_users": ec.batch_users, "candidates": cand, "per_user_dir": per_user_dir,
           "runs": [{k: r.get(k) for k in ("dir", "tag", "backbone", "variant", "seed", "cutoff", "user_embeddings")}
                    for r in records],
           "pairs": _pairs(records, protocols)}
    logger.warning("[evaluate] %d run(s) on %d shard(s)%s", len(records), len(shards),
                   ", candidates reused" if cand and cand["reuse"] else "")
    # SPREAD: shards go to every node of a cluster rather than filling the first one
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(evaluate_shard)
    job_ref = ray.put(job)
    res = sorted(_ray_get([task.remote(s, job_ref) for s in shards]), key=lambda r: r["shard"])
    num_users = sum(r["users"] for r in res)
    if not num_users:
        raise ValueError(f"{lay.sequences}: no user has 3 or more items (leave-one-out needs train, valid, test)")
    if cand is not None and not cand["reuse"]:
        storage.write_json(storage.join(cand["dir"], KEY_FILE),
                           {"key": cand["key"], "parts": sorted(r["candidates_part"] for r in res if r["candidates_part"])})
    names = metric_names(ks)
    results = _aggregate(records, res, protocols, names)
    out = {
        "description": "see docs/rec.md#metricsjson",
        "ks": ks, "metrics": names, "protocols": protocols,
        "num_users": num_users, "num_items": n_items,
        "sampled": {"num_negatives": ec.num_negatives, "seed": ec.candidates_seed,
                    "candidates": f"eval/{CANDIDATES}/", "reused": cand["reuse"]} if cand is not None else None,
        "per_user": f"eval/{PER_USER}/", "shards": len(shards),
        "random": {p: {m: sum(r["random"][p][m] for r in res if p in r["random"]) / num_users for m in names}
                   for p in ("sampled", "full") if p in protocols},
        "rationales": {"read": list(ec.rationales), "full_prefix_missing": full_missing},
        "results": results,
        "significance": _significance(records, res, results, ec, per_user_dir, wilcoxon_max_users),
    }
    storage.write_json(storage.join(lay.eval, "metrics.json"), out)
    info = {"node_ids": sorted({r["node_id"] for r in res if r["node_id"]}), "shards": len(shards),
            "per_user_rows": sum(r["rows"] for r in res)}
    return out, info


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _aggregate(records, res, protocols, names) -> dict[str, Any]:
    """Means per run from the shards' sums; per seed, mean and std over seeds of every (backbone, variant)."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        shards = [s["runs"][r["tag"]] for s in res if s["runs"].get(r["tag"], {}).get("n")]
        n = sum(x["n"] for x in shards)
        means = {p: {m: sum(x["sums"][p][m] for x in shards) / n for m in names} for p in protocols}
        groups.setdefault((r["backbone"], r["variant"]), []).append({**r, "n": n, "means": means})
    results: dict[str, Any] = {}
    for (bb, var), items in sorted(groups.items()):
        items.sort(key=lambda x: x["seed"])
        metas = [x["meta"] for x in items]
        entry: dict[str, Any] = {"runs": [f"rec/{storage.basename(x['dir'])}" for x in items],  # +full: same folder
                                 "seeds": [x["seed"] for x in items],
                                 "per_seed": {str(x["seed"]): x["means"] for x in items}, "mean": {}, "std": {},
                                 "fallback_users": [m.get("fallback_users", 0) for m in metas],
                                 "best_epoch": [m.get("best_epoch") for m in metas],
                                 "train_seconds": [m.get("wall_seconds") for m in metas],
                                 "mean_epoch_seconds": [float(np.mean(m["epoch_seconds"])) if m.get("epoch_seconds") else None
                                                        for m in metas],
                                 "n_users": int(items[0]["n"])}
        for p in protocols:
            entry["mean"][p], entry["std"][p] = {}, {}
            for m in names:
                entry["mean"][p][m], entry["std"][p][m] = _stats([x["means"][p][m] for x in items])
        results.setdefault(bb, {})[var] = entry
    return results


def _significance(records, res, results, ec, per_user_dir: str, max_users: int) -> dict[str, Any]:
    """Paired test of each SLIM/text variant against the better (by mean) of id / id_text, on the
    per-user metric averaged over the seeds: t-test from the shards' sums; Wilcoxon from the
    per-user rows when at most ``max_users`` users are compared."""
    metric = ec.significance_metric
    chosen = []
    for bb, variants in results.items():
        bases = [v for v in BASELINES if v in variants]
        for var in variants:
            if var in BASELINES or not bases:
                continue
            for p in ec.protocols:
                best = max(bases, key=lambda v: results[bb][v]["mean"][p][metric])
                key = f"{bb}|{var}|{best}|{p}"
                parts = [s["pairs"][key] for s in res if key in s["pairs"]]
                if not parts:  # the runs of the two variants scored different users
                    continue
                total = parts[0]
                for x in parts[1:]:
                    total = add_paired_sums(total, x)
                chosen.append((bb, var, best, p, total))
    need = {(bb, v) for bb, var, best, _, s in chosen if s["n"] <= max_users and s["max_abs_d"] > 1e-8
            for v in (var, best)}
    columns = _read_per_user(per_user_dir, {r["tag"] for r in records if (r["backbone"], r["variant"]) in need},
                             list(ec.protocols), metric) if need else {}
    tags = {}
    for r in records:
        tags.setdefault((r["backbone"], r["variant"]), []).append(r["tag"])
    significance: dict[str, Any] = {}
    for bb, var, best, p, s in chosen:
        entry = {"baseline": best, "metric": metric, **paired_test_from_sums(s)}
        if s["max_abs_d"] <= 1e-8:
            entry["p_wilcoxon"] = 1.0
        elif s["n"] <= max_users:
            ua, a = _seed_mean(columns, tags[(bb, var)], p)
            ub, b = _seed_mean(columns, tags[(bb, best)], p)
            if not np.array_equal(ua, ub):
                raise ValueError(f"per-user rows of {var} and {best} ({p}) hold different users")
            entry["p_wilcoxon"] = wilcoxon_p(a, b)
        else:
            entry["p_wilcoxon"] = None
            entry["wilcoxon_skipped"] = (f"{s['n']} users > {max_users}: the Wilcoxon test needs every user's "
                                         "values in one process; the t-test is computed from sums")
        significance.setdefault(bb, {}).setdefault(var, {})[p] = entry
    return significance


def _read_per_user(folder: str, runs: set[str], protocols: list[str], metric: str) -> dict[tuple[str, str], tuple]:
    """{(run, protocol): (user_ids sorted, metric values)} of some runs, from the per-user rows."""
    import pyarrow.compute as pc

    tables = []
    for f in storage.parquet_files(folder):
        t = storage.read_parquet_file(f, columns=["user_id", "run", "protocol", metric])
        tables.append(t.filter(pc.is_in(t.column("run"), pa.array(sorted(runs)))))
    t = pa.concat_tables(tables)
    out = {}
    for run in runs:
        for prot in protocols:
            sub = t.filter(pc.and_(pc.equal(t.column("run"), run), pc.equal(t.column("protocol"), prot)))
            sub = sub.sort_by("user_id")
            out[(run, prot)] = (sub.column("user_id").to_numpy(), sub.column(metric).to_numpy())
    return out


def _seed_mean(columns, tags: list[str], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, per-user metric averaged over the runs ``tags``), checking they scored the same users."""
    users = columns[(tags[0], protocol)][0]
    for t in tags[1:]:
        if not np.array_equal(columns[(t, protocol)][0], users):
            raise ValueError(f"per-user rows of {tags[0]} and {t} ({protocol}) hold different users")
    return users, np.mean([columns[(t, protocol)][1] for t in tags], axis=0)


def format_table(metrics: dict[str, Any], cols=("ndcg@10", "hr@10", "hr@20")) -> str:
    """A Markdown table (mean +- std over seeds, in %) of metrics.json (the columns it has)."""
    prots = metrics["protocols"]
    cols = [c for c in cols if c in metrics["metrics"]]
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
