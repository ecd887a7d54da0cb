"""Benchmark: ``slim-ray prepare`` on Ray Data vs a single-process pyarrow run of the same code.

    .venv/bin/python bench/prepare.py [--users 1000000] [--mean-length 22] [--data DIR]

1. Generates (once; reused when the same size is already there) a synthetic Amazon-format log with
   ``slim-ray synth`` (JSON lines shards + metadata): ``--users`` users, about
   ``--mean-length`` interactions each (1M users x 22 -> ~22M interactions).
2. Runs the prepare stage on Ray (``run_prepare``: parallel parse, vocabularies, encode, iterative
   k-core, one shuffle by user bucket, per-bucket sequence files) in a child process.
3. Runs the single-process reference (``read_local`` + ``prepare_tables``: the same parsing and
   transformation functions on one whole in-memory table) in another child process.
4. Checks the two outputs are identical and prints wall time, rows/s and peak memory of each, and
   the ratios. Memory is the whole process tree (driver, GCS, raylet, every worker): peak of the
   summed RSS, and of the summed PSS, which splits shared pages (the object store's shared memory)
   fairly instead of counting them once per process.
"""

from __future__ import annotations

from slim_ray.runtime import pin_loopback

pin_loopback()  # before anything imports Ray: a local Ray listens on 127.0.0.1 only

import argparse
import json
import os
import subprocess
import sys
import time

import psutil

from slim_ray.scale.monitor import TreeMonitor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- measuring


def run_child(argv: list[str], log_path: str) -> dict:
    """Run ``bench/prepare.py --child ...``; return its JSON result + wall time and peak memory."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv, stdout=subprocess.PIPE,
                                stderr=log, text=True, cwd=ROOT)
        mon = TreeMonitor(proc.pid)
        mon.start()
        out, _ = proc.communicate()
        mon.stop()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {argv[:2]} failed (exit {proc.returncode}); see {log_path}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall=wall, peak_rss=mon.peak_rss, peak_pss=mon.peak_pss, processes=mon.peak_procs,
                  cpu_seconds=mon.cpu_seconds)
    return result


# --------------------------------------------------------------------------- children


def _prepare_overrides(args) -> list[str]:
    return [
        "data.source=amazon",
        f"data.interactions={os.path.join(args.data, 'reviews')}",
        f"data.items={os.path.join(args.data, 'meta')}",
        f"data.min_user_count={args.min_count}", f"data.min_item_count={args.min_count}",
        f"ray.num_cpus={args.num_cpus}", f"ray.object_store_memory_mb={args.object_store_mb}",
        "ray.include_dashboard=false",
    ]


def child_synth(args) -> dict:
    from slim_ray.config import load_config
    from slim_ray.data.synth import run_synth

    cfg = load_config(None, [f"synth.out={args.data}", f"synth.num_users={args.users}",
                             f"synth.mean_length={args.mean_length}", f"synth.seed={args.seed}",
                             f"ray.num_cpus={args.num_cpus}", "ray.include_dashboard=false"])
    return run_synth(cfg.synth, cfg.ray)


def child_ray(args) -> dict:
    from slim_ray.config import load_config
    from slim_ray.data.stage import run_prepare

    cfg = load_config(None, [f"run_dir={args.out}"] + _prepare_overrides(args))
    return run_prepare(cfg)


def child_local(args) -> dict:
    from slim_ray.config import load_config
    from slim_ray.data.prepare import prepare_tables
    from slim_ray.data.readers import build_specs, read_local
    from slim_ray.data.io import write_table
    from slim_ray.data.stage import input_files
    from slim_ray.storage import join

    cfg = load_config(None, [f"run_dir={args.out}"] + _prepare_overrides(args))
    d = cfg.data
    t0 = time.time()
    si, sm = build_specs(d, *input_files(d))
    inter, skipped, _ = read_local(si)
    meta = read_local(sm)[0]
    t_read = time.time() - t0
    items, seqs, summary = prepare_tables(
        inter, meta, min_user_count=d.min_user_count, min_item_count=d.min_item_count,
        max_seq_len=d.max_seq_len, max_users=d.max_users, min_rating=d.min_rating, dedup=d.dedup,
        item_kwargs=dict(fields=tuple(d.text_fields), category_label="Categories"),
    )
    write_table(seqs, join(cfg.layout.sequences, "part-00000.parquet"))
    write_table(items, join(cfg.layout.items, "part-00000.parquet"))
    return {**summary, "raw": {"interactions": inter.num_rows}, "skipped_lines": skipped,
            "timings": {"read": round(t_read, 2), "transform+write": round(time.time() - t0 - t_read, 2)}}


# --------------------------------------------------------------------------- main


def _mib(x: int) -> str:
    return f"{x / 2**20:,.0f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--mean-length", type=float, default=22.0)
    p.add_argument("--min-count", type=int, default=5, help="k-core min count (users and items)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="synthetic log folder (default runs/bench-prepare/synth-<users>)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench-prepare"))
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--object-store-mb", type=int, default=3072)
    p.add_argument("--skip-local", action="store_true", help="only the Ray run")
    p.add_argument("--child", choices=["synth", "ray", "local"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data = args.data or os.path.join(args.work, f"synth-{args.users}-{args.mean_length:g}-s{args.seed}")

    if args.child:
        fn = {"synth": child_synth, "ray": child_ray, "local": child_local}[args.child]
        print(json.dumps(fn(args), default=str))
        return 0

    os.makedirs(args.work, exist_ok=True)
    common = ["--users", str(args.users), "--mean-length", str(args.mean_length), "--seed", str(args.seed),
              "--data", args.data, "--num-cpus", str(args.num_cpus), "--object-store-mb", str(args.object_store_mb),
              "--min-count", str(args.min_count)]
    marker = os.path.join(args.data, "synth.json")
    if os.path.exists(marker):
        synth = json.load(open(marker))["summary"]
        print(f"[bench] reusing {args.data}: {synth['interactions']:,} interactions, {synth['users']:,} users")
    else:
        print(f"[bench] generating {args.users:,} users (synth on Ray) ...", flush=True)
        synth = run_child(["--child", "synth"] + common, os.path.join(args.work, "synth.log"))
        print(f"[bench] synth: {synth['interactions']:,} interactions in {synth['wall']:.0f}s, "
              f"peak PSS {_mib(synth['peak_pss'])}", flush=True)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.data) for f in fs)

    results = {}
    runs = [("ray", "Ray Data (run_prepare)")] + ([] if args.skip_local else [("local", "single process (pyarrow)")])
    for name, label in runs:
        out = os.path.join(args.work, f"out-{name}")
        print(f"[bench] {label} ...", flush=True)
        r = run_child(["--child", name, "--out", out] + common, os.path.join(args.work, f"{name}.log"))
        r["rows"] = r["raw"]["interactions"]
        results[name] = r
        print(f"[bench]   {r['wall']:.1f}s, {r['rows'] / r['wall']:,.0f} rows/s, {r['cpu_seconds']:.0f} CPU-s, "
              f"peak RSS {_mib(r['peak_rss'])}, "
              f"peak PSS {_mib(r['peak_pss'])} ({r['processes']} processes); timings {r.get('timings')}", flush=True)

    same = None
    if "local" in results:
        from slim_ray.data.io import read_items, read_sequences

        a = read_sequences(os.path.join(args.work, "out-ray", "prepared", "sequences")).sort_by("user_id")
        b = read_sequences(os.path.join(args.work, "out-local", "prepared", "sequences")).sort_by("user_id")
        ia = read_items(os.path.join(args.work, "out-ray", "prepared", "items"))
        ib = read_items(os.path.join(args.work, "out-local", "prepared", "items"))
        same = bool(a.equals(b) and ia.sort_by("item_id").equals(ib.sort_by("item_id")))
        del a, b, ia, ib

    r = results["ray"]
    print()
    print(f"input: {r['rows']:,} interactions, {synth['users']:,} users, {size / 2**30:.2f} GiB of JSON lines "
          f"({args.data}); after {args.min_count}-core: {r['users']:,} users, {r['items']:,} items, "
          f"{r['interactions']:,} interactions; machine: {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':<30} {'wall s':>8} {'rows/s':>12} {'CPU s':>8} {'peak RSS':>12} {'peak PSS':>12}")
    for name, label in runs:
        x = results[name]
        print(f"{label:<30} {x['wall']:>8.1f} {x['rows'] / x['wall']:>12,.0f} {x['cpu_seconds']:>8.0f} "
              f"{_mib(x['peak_rss']):>12} {_mib(x['peak_pss']):>12}")
    if "local" in results:
        l = results["local"]
        print(f"speed-up Ray / single process: {l['wall'] / r['wall']:.2f}x (CPU-seconds ratio "
              f"{r['cpu_seconds'] / max(l['cpu_seconds'], 1e-9):.2f}); "
              f"peak PSS ratio Ray / single process: {r['peak_pss'] / l['peak_pss']:.2f}; identical outputs: {same}")
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump({"args": vars(args), "synth": synth, "input_bytes": size, "results": results,
                   "identical": same}, f, indent=2, default=str)
    return 0 if same in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
