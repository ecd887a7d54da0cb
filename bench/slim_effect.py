"""SLIM's effect in one table per ranking protocol: every variant against the better of id /
id_text, each rationale variant's time-consistent runs against its leaky ones, and (with
``evaluate.rationales: [cut, full_prefix]``) the same runs read with the full-prefix rationale
(``<variant>+full``) against their cut rationale, paired per user.

    .venv/bin/python bench/slim_effect.py --run-dir runs/effect [--metric ndcg@10] [--json out.json]

Reads ``eval/per_user/`` (written by ``slim-ray evaluate``; run configs/effect.yaml first). A
variant's per-user metric is averaged over its seeds, then paired with the other variant's on the
same users (paired t-test and Wilcoxon signed-rank, two-sided), as ``slim-ray evaluate`` does for
its own significance entries. Mean ± std over seeds comes from the per-seed means.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

from slim_ray.rec.config import FULL_PREFIX_VARIANT
from slim_ray.rec.evaluate import BASELINES  # the variants every other one is compared with


def per_user(folder: str, metric: str) -> dict[tuple[str, str, str], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """{(backbone, variant, protocol): {seed: (user_ids sorted, values)}} from the per-user rows."""
    import pyarrow as pa

    from slim_ray import storage

    tables = [storage.read_parquet_file(f, columns=["user_id", "backbone", "variant", "seed", "protocol", metric])
              for f in storage.parquet_files(folder)]
    if not tables:
        raise FileNotFoundError(f"{folder}: no per-user rows (run `slim-ray evaluate` first)")
    t = pa.concat_tables(tables).sort_by([("backbone", "ascending"), ("variant", "ascending"),
                                          ("protocol", "ascending"), ("seed", "ascending"), ("user_id", "ascending")])
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    out: dict = defaultdict(dict)
    keys = list(zip(cols["backbone"], cols["variant"], cols["protocol"], cols["seed"]))
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            bb, var, prot, seed = keys[start]
            out[(bb, var, prot)][int(seed)] = (cols["user_id"][start:i].astype(np.int64),
                                               cols[metric][start:i].astype(np.float64))
            start = i
    return out


def seed_mean(runs: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    users = next(iter(runs.values()))[0]
    for seed, (u, _) in runs.items():
        if not np.array_equal(u, users):
            raise ValueError(f"seed {seed} scored other users than the first seed")
    return users, np.mean([v for _, v in runs.values()], axis=0)


def compare(a, b) -> dict:
    from slim_ray.rec.metrics import paired_test

    (ua, va), (ub, vb) = a, b
    if not np.array_equal(ua, ub):
        raise ValueError("the two variants scored different users")
    return paired_test(va, vb)


def effect_rows(data, protocol: str) -> list[dict]:
    rows = []
    for bb in sorted({k[0] for k in data}):
        variants = {k[1]: v for k, v in data.items() if k[0] == bb and k[2] == protocol}
        means = {var: seed_mean(runs) for var, runs in variants.items()}
        bases = [v for v in BASELINES if v in means]
        best = max(bases, key=lambda v: means[v][1].mean()) if bases else None
        for var in sorted(variants, key=lambda v: (v not in BASELINES, v.partition("@")[0], v)):
            seed_means = [vals.mean() for _, vals in variants[var].values()]
            row = {"backbone": bb, "variant": var, "seeds": len(seed_means),
                   "mean": float(np.mean(seed_means)), "std": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0}
            if best and var not in BASELINES:
                row["vs_baseline"] = {"baseline": best, **compare(means[var], means[best])}
            leaky, full = var + "@leaky", var + FULL_PREFIX_VARIANT
            if "@" not in var and leaky in means:
                row["consistent_vs_leaky"] = compare(means[var], means[leaky])
            if full in means:
                row["full_prefix_vs_cut"] = compare(means[full], means[var])
            rows.append(row)
    return rows


def markdown(rows: list[dict], protocol: str, metric: str) -> str:
    lines = [f"{protocol} ranking, {metric} in %, mean ± std over seeds; p: paired t-test / Wilcoxon on "
             "per-user values averaged over seeds", "",
             f"| backbone | variant | seeds | {metric} | vs best of id / id_text | p (t / W) | consistent − leaky | p (t / W) "
             "| full-prefix − cut rationale | p (t / W) |",
             "|---|---|---:|---:|---|---|---:|---|---:|---|"]
    for r in rows:
        cells = [r["backbone"], r["variant"], str(r["seeds"]), f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"]
        vb = r.get("vs_baseline")
        cells += ([f"{100 * vb['mean_diff']:+.2f} vs {vb['baseline']}", f"{vb['p_ttest']:.2g} / {vb['p_wilcoxon']:.2g}"]
                  if vb else ["", ""])
        for key in ("consistent_vs_leaky", "full_prefix_vs_cut"):
            cl = r.get(key)
            cells += [f"{100 * cl['mean_diff']:+.2f}", f"{cl['p_ttest']:.2g} / {cl['p_wilcoxon']:.2g}"] if cl else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder (local path or URI) with eval/per_user/")
    p.add_argument("--metric", default="ndcg@10")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)

    from slim_ray.config import load_config

    lay = load_config(None, [f"run_dir={args.run_dir}"]).layout
    from slim_ray import storage

    data = per_user(storage.join(lay.eval, "per_user"), args.metric)
    out = {}
    for protocol in sorted({k[2] for k in data}, reverse=True):  # sampled first, then full
        out[protocol] = effect_rows(data, protocol)
        print(markdown(out[protocol], protocol, args.metric) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
