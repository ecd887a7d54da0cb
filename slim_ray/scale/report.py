"""The markdown table and plots of `slim-ray bench scale` results (BENCHMARKS.md)."""

from __future__ import annotations

import os
from typing import Any

from slim_ray.scale.harness import STAGES, STAND_IN_NOTE

# The scale goals: seconds per user at the largest size within 1.3x of the size below it, the
# driver's peak RSS at most 1.5x and under 2 GiB.
PER_USER_RATIO_GOAL = 1.3
DRIVER_RATIO_GOAL = 1.5
DRIVER_LIMIT_MIB = 2048


def _sizes(results: dict[str, Any]) -> list[int]:
    return sorted(int(n) for n in results["sizes"])


def _fmt(x, spec: str = ",.1f") -> str:
    return "–" if x is None else format(x, spec)


def per_user_s(results: dict[str, Any], n: int, stage: str):
    r = results["sizes"][str(n)].get(stage)
    return None if not r else r["wall_s"] / n


def table(results: dict[str, Any]) -> str:
    lines = ["| stage | users | wall s | s per 1k users | rows | rows/s | CPU-s | driver RSS MiB | "
             "Ray tree PSS MiB | spill MiB | output MiB | files |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        for n in _sizes(results):
            r = results["sizes"][str(n)].get(stage)
            if not r:
                continue
            rows = r.get("rows")
            rate = rows / r["wall_s"] if rows and r["wall_s"] else None
            mark = " †" if stage in ("teach", "reason") else ""
            lines.append(
                f"| {stage}{mark} | {n:,} | {r['wall_s']:,.1f} | {1000 * r['wall_s'] / n:.3f} | "
                f"{_fmt(rows, ',')} {r.get('rows_what', '')} | {_fmt(rate, ',.0f')} | {r['cpu_s']:,.0f} | "
                f"{r['driver_rss_mib']:,.0f} | {r['tree_pss_mib']:,.0f} | {r['spill_mib']:,.0f} | "
                f"{_fmt(r.get('output_bytes', 0) / 2**20, ',.1f')} | {_fmt(r.get('output_files'), ',')} |")
    lines.append(f"\n† {STAND_IN_NOTE}.")
    return "\n".join(lines)


def stages_measured(results: dict[str, Any]) -> str:
    """Which stages each size has figures for (a size may have been run with ``--stages``)."""
    parts = []
    for n in _sizes(results):
        done = [st for st in STAGES if results["sizes"][str(n)].get(st)]
        parts.append(f"{n:,}: " + ("all stages" if len(done) == len(STAGES) else ", ".join(done) or "none"))
    return "Stages measured per size: " + "; ".join(parts) + "."


def checks(results: dict[str, Any]) -> list[str]:
    """The scale goals, largest size against the one below it."""
    sizes = _sizes(results)
    if len(sizes) < 2:
        return ["(one size measured: no ratios)"]
    small, big = sizes[-2], sizes[-1]
    out = [f"Ratios {big:,} vs {small:,} users (goal: seconds per user ≤ {PER_USER_RATIO_GOAL}×; driver peak "
           f"RSS ≤ {DRIVER_RATIO_GOAL}× and < {DRIVER_LIMIT_MIB} MiB):", "",
           "| stage | s/user ratio | driver RSS ratio | driver RSS at the largest | met |", "|---|---:|---:|---:|---|"]
    for stage in STAGES:
        a, b = results["sizes"][str(small)].get(stage), results["sizes"][str(big)].get(stage)
        if not a or not b:
            continue
        t_ratio = (b["wall_s"] / big) / (a["wall_s"] / small)
        m_ratio = b["driver_rss_mib"] / a["driver_rss_mib"] if a["driver_rss_mib"] else float("nan")
        ok = t_ratio <= PER_USER_RATIO_GOAL and m_ratio <= DRIVER_RATIO_GOAL and b["driver_rss_mib"] < DRIVER_LIMIT_MIB
        # serve: start-up is per replica, not per user; train: a fixed number of steps, read against
        # its seconds per step (training_ratio). Memory only here.
        if stage in ("serve", "train"):
            ok = m_ratio <= DRIVER_RATIO_GOAL and b["driver_rss_mib"] < DRIVER_LIMIT_MIB
        out.append(f"| {stage} | {t_ratio:.2f}× | {m_ratio:.2f}× | {b['driver_rss_mib']:,.0f} MiB | "
                   f"{'yes' if ok else '**no**'} |")
    return out


def plots(results: dict[str, Any], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    sizes = _sizes(results)
    paths = []
    for key, ylabel, fname in [("per_1k", "seconds per 1k users", "seconds_per_1k_users.png"),
                               ("driver_rss_mib", "driver peak RSS (MiB)", "driver_rss.png")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for stage in STAGES:
            xs, ys = [], []
            for n in sizes:
                r = results["sizes"][str(n)].get(stage)
                if r:
                    xs.append(n)
                    ys.append(1000 * r["wall_s"] / n if key == "per_1k" else r[key])
            if xs:
                ax.plot(xs, ys, marker="o", label=stage)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("users")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def training(results: dict[str, Any]) -> list[str]:
    """Training per step: the batch is fixed, so seconds per step follow the catalogue (full softmax
    over every item), not the number of users."""
    rows = []
    for n in _sizes(results):
        size = results["sizes"][str(n)]
        t = size.get("train")
        if not t or not t.get("steps"):
            continue
        items = (size.get("prepare") or {}).get("items")
        rows.append(f"| {n:,} | {_fmt(items, ',')} | {t.get('loss')} | {t['workers']} | {t['steps']:,} | "
                    f"{t['s_per_step']:.3f} | {_fmt(t.get('examples_per_s'), ',.0f')} | {_fmt(t.get('worker_rss_mib'), ',.0f')} |")
    if not rows:
        return []
    run = results["sizes"][str(_sizes(results)[-1])].get("train", {}).get("run", "sasrec-slim-student-s0")
    return [f"Training (run `{run}`, a fixed number of steps (`rec.max_steps`), global batch 256, "
            "users reaching the 2 workers through Ray Data (`rec.ingest=dataset`); seconds per step exclude "
            "validation and the user-state build):", "",
            "| users | items after k-core | loss | workers | steps | s per step | examples/s | worker peak RSS MiB |",
            "|---:|---:|---|---:|---:|---:|---:|---:|", *rows, *training_ratio(results)]


def training_ratio(results: dict[str, Any]) -> list[str]:
    """Seconds per step and examples/s of the largest size against the one below (goal: 1.3×)."""
    sized = [n for n in _sizes(results) if (results["sizes"][str(n)].get("train") or {}).get("steps")]
    if len(sized) < 2:
        return []
    a, b = (results["sizes"][str(n)]["train"] for n in sized[-2:])
    items = [(results["sizes"][str(n)].get("prepare") or {}).get("items") for n in sized[-2:]]
    step, rate = b["s_per_step"] / a["s_per_step"], a["examples_per_s"] / b["examples_per_s"]
    if items[0] and items[1] and abs(items[1] - items[0]) > 0.05 * items[0]:
        # a step scores every item (full softmax): the goal compares equal catalogues only
        verdict = f"the catalogues differ ({items[0]:,} vs {items[1]:,} items), so the goal does not apply"
    else:
        ok = step <= PER_USER_RATIO_GOAL and rate <= PER_USER_RATIO_GOAL
        verdict = f"goal within {PER_USER_RATIO_GOAL}×: {'met' if ok else '**not met**'}"
    return ["", f"{sized[-1]:,} vs {sized[-2]:,} users: seconds per step {step:.2f}×, examples/s {1 / rate:.2f}× "
            f"({verdict}); worker peak RSS {_fmt(a.get('worker_rss_mib'), ',.0f')} → "
            f"{_fmt(b.get('worker_rss_mib'), ',.0f')} MiB."]


def serving(results: dict[str, Any]) -> list[str]:
    """The serve warm-up per size: time to ready and the recommender replica's own memory."""
    rows = []
    for n in _sizes(results):
        v = results["sizes"][str(n)].get("serve")
        if v and v.get("replica_rss_mib") is not None:
            rows.append(f"| {n:,} | {v['ready_s']:.1f} | {_fmt(v.get('replica_load_s'), '.2f')} | "
                        f"{v['replica_rss_mib']:,.0f} | {_fmt(v.get('replica_pss_mib'), ',.0f')} | "
                        f"{_fmt(v.get('replica_peak_rss_mib'), ',.0f')} | {v['p50_ms']:.1f} |")
    if not rows:
        return []
    return ["Serving (`slim-ray serve` until ready, then 20 known-user requests; the recommender replica's own "
            "figures from `GET /info`, after the requests; the per-user state is memory-mapped, so its pages are "
            "page cache, in RSS but shared by the node's replicas):", "",
            "| users | ready s (Ray start included) | replica checkpoint + state load s | replica RSS MiB | "
            "replica PSS MiB | replica peak RSS MiB | request p50 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|", *rows]


def kill_resume(results: dict[str, Any]) -> list[str]:
    out = []
    for n in _sizes(results):
        k = results["sizes"][str(n)].get("reason_kill_resume")
        if k:
            out.append(f"- {n:,} users: driver tree SIGKILLed after {k['killed_after_s']:.0f} s with "
                       f"{k['rows_kept_after_kill']:,} rows in the folder; the rerun skipped "
                       f"{_fmt(k.get('skipped_already_done'), ',')} done users and ended with {k['rows']:,} rows, "
                       f"{k['distinct_pairs']:,} distinct (user, key) pairs, {k['distinct_users']:,} users "
                       f"(selected {_fmt(k.get('users_selected'), ',')}), duplicates {k['duplicates']} ({STAND_IN_NOTE}).")
    return out


def real_engine_lines(results: dict[str, Any]) -> list[str]:
    r, f = results.get("real_engine"), results.get("fleet")
    if not r:
        return []
    lines = [f"A real engine in the same run, at demo scale: `{r['engine']}` with {r['model']}, "
             f"{r['replicas']} replica × {r['cpus_per_replica']} CPU, {r['rows']} MovieLens-100K users: "
             f"{r['output_tokens']:,} output tokens in {r['generation_s']:.1f} s = "
             f"**{r['output_tokens_per_s']:.1f} tokens/s** ({r['wall_s']:.0f} s with Ray start and model load)."]
    if f:
        lines += ["", f"What {f['users']:,} users' rationales ({f['new_tokens']} new tokens each) take with a real LLM: "
                  f"users × tokens ÷ tokens/s per replica = {f.get('cpu_replica_hours', '–')} hours on one such CPU "
                  f"replica; at {f['a100_s_per_rationale']} s per rationale per A100 ({f['a100_source']}) "
                  f"{f['a100_gpu_hours']:,} A100-hours, i.e. {f['a100_gpu_hours'] / 64:,.1f} hours on 64 A100s. "
                  "The stand-in rows above measure everything around the LLM; these figures bound the LLM itself."]
    return lines


def other_run(results: dict[str, Any]) -> list[str]:
    """A section for the results of another invocation (its own --set overrides)."""
    sets = " ".join(results.get("sets") or []) or "(none)"
    return [f"## Also measured: `--set {sets}`", "", f"{stages_measured(results)} {results['machine']['date']}.", "",
            table(results), "", *checks(results), "", *training(results), "", *serving(results), ""]


def write_markdown(results: dict[str, Any], path: str, plot_folder: str, also: tuple = ()) -> str:
    """BENCHMARKS.md: the table, ratios, training, kill/resume and real-engine lines of ``results``,
    its plots, then a section per results dict of ``also``."""
    m = results["machine"]
    si = results.get("stand_in", {})
    pics = plots(results, plot_folder)
    rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(path))) for p in pics]
    text = "\n".join([
        "# Scale benchmark (`slim-ray bench scale`)", "",
        f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['platform']}, Python {m['python']}; {m['date']}.",
        f"Command: `slim-ray bench scale --users {','.join(str(n) for n in _sizes(results))}` "
        "(configs/scale.yaml: synthetic Amazon-format log, a fixed catalogue of 10k items, k-core 5).",
        stages_measured(results),
        f"LLM stages: {STAND_IN_NOTE}; latency {si.get('latency_ms')} ms, {si.get('words')} words per answer.",
        "Each stage is its own `slim-ray <stage>` process with a local Ray (its start, ~10–20 s, is in the wall "
        "time); memory is sampled every 0.5 s: the driver's RSS, and the summed PSS of the driver and every Ray "
        "process it started.", "",
        table(results), "", *checks(results), "", *training(results), "", *serving(results), "", *kill_resume(results), "", *real_engine_lines(results), "",
        *[f"![{os.path.basename(p)}]({p})" for p in rel], "",
        *[line for other in also for line in other_run(other)],
    ])
    with open(path, "w") as f:
        f.write(text)
    return text
