"""Benchmark: a recommender replica's per-user state at scale, dicts vs the memory-mapped state.

    .venv/bin/python bench/serve_scale.py [--users 1000000] [--history 20] [--dim 384] [--data DIR]

1. Writes (once per size; reused when already there) a synthetic run for ``--users`` users straight
   to a local folder, no pipeline: the three contracts a replica reads for its users, as Parquet
   parts of 100k rows (``prepared/sequences``: histories of 5..35 items, ~``--history`` on average;
   ``embeddings/student``: a ``--dim`` float32 unit vector per user; ``rationales/student``: a text
   of ~``--text-chars`` characters per user), and the same content as a per-user state folder
   (``slim_ray.data.userstate``: ``.npy`` files + ``state.json``) written directly with NumPy.
   ``--check-build`` also builds the state from the Parquet parts with ``userstate.build`` (what
   ``slim-ray serve`` does once per data version) in a child process, reports its time and peak
   anonymous / file-backed RSS, and checks it equals the direct one.
2. Measures, each in a fresh subprocess, side by side:
   (a) ``dict``: the loading the replica did before, re-implemented here as the reference: the
       sequences into ``{user_id: [item ids]}``, ``load_embeddings`` into ``{user_id: vector}``
       (rows of one array), the rationales into ``{user_id: text}``;
   (b) ``mmap``: ``UserState.open`` (``np.load(mmap_mode="r")``).
   For each: start time (from before the loader's imports to the answer of the first lookup), RSS
   and PSS after start (``/proc/self/smaps_rollup``), p50/p99 latency of ``--lookups`` random
   lookups of a known user (history + vector + rationale text, as ``Recommender.plan`` does for a
   user_id request), and RSS, PSS and anonymous RSS (``/proc/self/status``) after them.
   Each kind runs ``--repeat`` times (alternating); the table shows the median of each measure.
3. Prints a table and the ratios (dict / mmap), and writes them as JSON next to the data.

Both read files the run just wrote (a warm page cache): the mmap start time is that of mapping
files, not of reading them from disk; its RSS after lookups counts the file pages the lookups
mapped (the kernel maps cached pages around each fault, 64 KiB by default, so random lookups map
more than the rows they read). Those are page cache, not the replica's own memory: shared with
every replica of the node that maps the same files (PSS splits them) and dropped under memory
pressure; anonymous RSS is what the process alone holds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PART_ROWS = 100_000
SENTENCES = [
    "Step 1: the user keeps coming back to character-driven dramas with slow, quiet endings.",
    "Step 1: recent picks lean towards space adventures and large-scale science fiction.",
    "Step 1: the history mixes animated family films with a few musicals.",
    "Step 1: crime stories and dark thrillers dominate the last few choices.",
    "Step 1: romantic comedies from the nineties appear again and again.",
]


# ----------------------------------------------------------------------------- data


def _text(u: int, chars: int) -> str:
    s = SENTENCES[u % len(SENTENCES)] + f" Step 2: user {u} would enjoy more of the same."
    return (s * (chars // len(s) + 1))[:chars]


def write_data(root: str, n_users: int, mean_history: int, dim: int, text_chars: int, seed: int = 0) -> dict:
    """The synthetic run (Parquet contracts) and its state folder (see module doc)."""
    import numpy as np
    import pyarrow as pa

    from slim_ray import storage
    from slim_ray.data.schemas import RATIONALES_SCHEMA, SEQUENCES_SCHEMA
    from slim_ray.encode import store
    from slim_ray.layout import RunLayout
    from slim_ray.data import userstate

    lay = RunLayout(os.path.join(root, "run"))
    state = os.path.join(root, "state")
    done = os.path.join(root, "data.json")
    if os.path.isfile(done):
        return json.load(open(done))
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_items = max(1000, n_users // 10)
    lens = rng.integers(max(1, mean_history - 15), mean_history + 16, size=n_users)
    off = np.zeros(n_users + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    os.makedirs(state, exist_ok=True)
    user_ids = np.arange(1, n_users + 1, dtype=np.int64)
    np.save(os.path.join(state, "user_ids.npy"), user_ids)
    np.save(os.path.join(state, "history_offsets.npy"), off)
    np.save(os.path.join(state, "has_vector.npy"), np.ones(n_users, bool))
    items = np.lib.format.open_memmap(os.path.join(state, "history_items.npy"), "w+", np.int64, (int(off[-1]),))
    vectors = np.lib.format.open_memmap(os.path.join(state, "vectors.npy"), "w+", np.float32, (n_users, dim))
    text_lens = np.zeros(n_users, np.int64)
    text_path = os.path.join(state, ".texts")
    with open(text_path, "wb") as texts_out:
        for p, a in enumerate(range(0, n_users, PART_ROWS)):
            b = min(a + PART_ROWS, n_users)
            uids = user_ids[a:b]
            flat = rng.integers(1, n_items + 1, size=int(off[b] - off[a]), dtype=np.int64)
            items[off[a]:off[b]] = flat
            rel = (off[a:b + 1] - off[a]).astype(np.int32)
            hist = pa.ListArray.from_arrays(pa.array(rel), pa.array(flat))
            times = pa.ListArray.from_arrays(pa.array(rel), pa.array(np.arange(len(flat), dtype=np.int64)))
            storage.write_table(pa.Table.from_arrays(
                [pa.array(uids), pa.array([f"u{u}" for u in uids]), hist, times], schema=SEQUENCES_SCHEMA),
                storage.join(lay.sequences, f"part-{p:05d}.parquet"))
            vec = rng.standard_normal((b - a, dim), dtype=np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            vectors[a:b] = vec
            storage.write_table(pa.Table.from_arrays([
                pa.array(uids), pa.array(["user"] * (b - a)), pa.array(["synthetic"] * (b - a)),
                pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
                pa.array([f"key{u}" for u in uids])], schema=store.output_schema(dim)),
                storage.join(lay.user_embeddings("student"), f"part-{p:05d}.parquet"))
            texts = [_text(int(u), text_chars) for u in uids]
            cols = {c: pa.nulls(b - a, RATIONALES_SCHEMA.field(c).type) for c in RATIONALES_SCHEMA.names}
            cols.update(rationale_key=pa.array([f"r{u}" for u in uids]), user_id=pa.array(uids),
                        role=pa.array(["student"] * (b - a)), prefix_len=pa.array(np.maximum(lens[a:b] - 2, 0)),
                        text=pa.array(texts))
            storage.write_table(pa.Table.from_pydict(cols, schema=RATIONALES_SCHEMA),
                                storage.join(lay.rationales("student"), f"part-{p:05d}.parquet"))
            encoded = [t.encode() for t in texts]
            text_lens[a:b] = [len(e) for e in encoded]
            texts_out.write(b"".join(encoded))
    toff = np.zeros(n_users + 1, np.int64)
    np.cumsum(text_lens, out=toff[1:])
    np.save(os.path.join(state, "rationale_offsets.npy"), toff)
    np.save(os.path.join(state, "rationale_bytes.npy"), np.fromfile(text_path, np.uint8))
    os.remove(text_path)
    items.flush()
    vectors.flush()
    del items, vectors
    userstate.write_manifest(state, userstate.sources(lay, "student"), users=n_users,
                             history_items=int(off[-1]), dim=dim, users_with_vector=n_users,
                             users_with_rationale=n_users)
    info = {"users": n_users, "history_items": int(off[-1]), "dim": dim, "text_chars": text_chars,
            "write_s": round(time.perf_counter() - t0, 1),
            "parquet_mib": round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(lay.root)
                                     for f in fs) / 2**20, 1),
            "state_mib": round(sum(os.path.getsize(os.path.join(state, f)) for f in os.listdir(state)) / 2**20, 1)}
    json.dump(info, open(done, "w"))
    return info


def build_child(root: str) -> dict:
    """Build the state from the Parquet parts with the serving code (``userstate.build``)."""
    from slim_ray.layout import RunLayout
    from slim_ray.data import userstate

    t0 = time.perf_counter()
    userstate.build(os.path.join(root, "built"), **userstate.sources(RunLayout(os.path.join(root, "run")), "student"))
    return {"build_s": round(time.perf_counter() - t0, 1)}


def _status_kib(pid: int, keys=("RssAnon", "RssFile")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def check_build(root: str) -> dict:
    """Build the state in a child process (its peak anonymous and file-backed RSS sampled every
    0.1 s: the output files are written through mappings, whose pages are page cache); the
    result must equal the directly written state."""
    import shutil

    import numpy as np

    from slim_ray.data import userstate

    shutil.rmtree(os.path.join(root, "built"), ignore_errors=True)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", "build", "--data", root],
                            stdout=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for k, v in _status_kib(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"the build failed (exit {proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    built = userstate.UserState.open(os.path.join(root, "built"))
    direct = userstate.UserState.open(os.path.join(root, "state"))
    for name in userstate.FILES:
        if not np.array_equal(getattr(built, name), getattr(direct, name)):
            raise SystemExit(f"built state differs from the direct one in {name}.npy")
    del built, direct
    shutil.rmtree(os.path.join(root, "built"), ignore_errors=True)
    return {**res, "build_peak_anon_mib": round(peak["RssAnon"] / 1024, 1),
            "build_peak_file_mib": round(peak["RssFile"] / 1024, 1)}


# ----------------------------------------------------------------------------- one replica's start


def _memory() -> dict:
    """RSS and PSS (smaps_rollup), and the anonymous part of RSS (/proc/self/status): memory that
    only this process holds and the kernel cannot drop. File-backed pages of a mapping are page
    cache: shared by every process mapping the file, and dropped under memory pressure."""
    out = {}
    for path, keys in (("/proc/self/smaps_rollup", ("Rss", "Pss")), ("/proc/self/status", ("RssAnon",))):
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key.lower() + "_mib"] = round(int(rest.split()[0]) / 1024, 1)
    return out


def child(kind: str, root: str, lookups: int, seed: int) -> dict:
    """Load the users as a replica does (``kind``), then look users up; printed as JSON."""
    t0 = time.perf_counter()
    import numpy as np

    if kind == "dict":
        from slim_ray import storage
        from slim_ray.encode.store import load_embeddings
        from slim_ray.layout import RunLayout

        lay = RunLayout(os.path.join(root, "run"))
        seq = storage.read_table(lay.sequences, columns=["user_id", "item_ids"])
        histories = dict(zip(seq.column("user_id").to_pylist(), seq.column("item_ids").to_pylist()))
        del seq
        uids, uvecs = load_embeddings(lay.user_embeddings("student"), kind="user")
        user_vectors = dict(zip(uids.tolist(), uvecs))
        del uids
        rat = storage.read_table(lay.rationales("student"), columns=["user_id", "prefix_len", "text", "error"])
        best: dict = {}
        for u, n, t, err in zip(*(rat.column(c).to_pylist() for c in ("user_id", "prefix_len", "text", "error"))):
            if err is None and t and (u not in best or (n or 0) >= best[u][0]):
                best[u] = (n or 0, t)
        rationales = {u: t for u, (_, t) in best.items()}
        del rat, best

        def lookup(u):
            h = histories.get(u)
            return list(h), user_vectors.get(u), rationales.get(u)
    else:
        from slim_ray.data.userstate import UserState

        state = UserState.open(os.path.join(root, "state"))

        def lookup(u):
            return state.history(u), state.vector(u), state.rationale(u)

    n_users = json.load(open(os.path.join(root, "data.json")))["users"]
    first = lookup(1)
    start_s = time.perf_counter() - t0
    assert first[0] and first[1] is not None and first[2]
    after_start = _memory()
    users = np.random.default_rng(seed).integers(1, n_users + 1, size=lookups).tolist()
    lat = np.empty(lookups)
    for i, u in enumerate(users):
        t = time.perf_counter_ns()
        h, v, r = lookup(u)
        lat[i] = time.perf_counter_ns() - t
        assert h and v is not None and r
    after = _memory()
    return {"kind": kind, "start_s": round(start_s, 3), **after_start,
            "rss_after_lookups_mib": after["rss_mib"], "pss_after_lookups_mib": after["pss_mib"],
            "rssanon_after_lookups_mib": after["rssanon_mib"],
            "p50_us": round(float(np.percentile(lat, 50)) / 1000, 1),
            "p99_us": round(float(np.percentile(lat, 99)) / 1000, 1)}


def run_child(kind: str, root: str, lookups: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--data", root,
                          "--lookups", str(lookups), "--seed", str(seed)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

ROWS = [("start_s", "start (s, to the first lookup)"), ("rss_mib", "RSS after start (MiB)"),
        ("pss_mib", "PSS after start (MiB)"), ("rss_after_lookups_mib", "RSS after lookups (MiB)"),
        ("pss_after_lookups_mib", "PSS after lookups (MiB)"),
        ("rssanon_after_lookups_mib", "anonymous RSS after lookups (MiB)"), ("p50_us", "lookup p50 (us)"),
        ("p99_us", "lookup p99 (us)")]


def table(res: dict, info: dict, lookups: int) -> str:
    d, m = res["dict"], res["mmap"]
    lines = [f"users {info['users']:,}, history items {info['history_items']:,}, dim {info['dim']}, "
             f"rationale ~{info['text_chars']} chars; {lookups:,} lookups",
             "| measure | dict (before) | mmap state | dict / mmap |", "|---|---:|---:|---:|"]
    for key, label in ROWS:
        ratio = d[key] / m[key] if m[key] else float("inf")
        lines.append(f"| {label} | {d[key]:,} | {m[key]:,} | {ratio:.1f}x |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--history", type=int, default=20, help="mean history length")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--text-chars", type=int, default=200)
    p.add_argument("--lookups", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="fresh subprocesses per kind; the table shows medians")
    p.add_argument("--data", default=None, help="data folder (default: /tmp/slim-serve-scale/<users>)")
    p.add_argument("--check-build", action="store_true", help="also build the state from Parquet and compare")
    p.add_argument("--child", choices=["dict", "mmap", "build"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "build":
        print(json.dumps(build_child(args.data)), flush=True)
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.data, args.lookups, args.seed)), flush=True)
        return 0
    root = args.data or os.path.join("/tmp", "slim-serve-scale", str(args.users))
    info = write_data(root, args.users, args.history, args.dim, args.text_chars, args.seed)
    print(f"[data] {root}: {json.dumps(info)}", flush=True)
    if args.check_build:
        info.update(check_build(root))
        print(f"[build] state from Parquet with userstate.build: {info['build_s']} s, peak anonymous RSS "
              f"{info['build_peak_anon_mib']} MiB (file-backed {info['build_peak_file_mib']} MiB), equal to the "
              "direct one", flush=True)
    runs: dict = {"dict": [], "mmap": []}
    for r in range(args.repeat):  # alternating, so a busy moment of the machine hits both
        for kind in runs:
            runs[kind].append(run_child(kind, root, args.lookups, args.seed + r))
            print(f"[{kind} {r + 1}/{args.repeat}] {json.dumps(runs[kind][-1])}", flush=True)
    res = {kind: {key: statistics.median(x[key] for x in rs) for key, _ in ROWS} for kind, rs in runs.items()}
    text = table(res, info, args.lookups)
    print(text)
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump({"data": info, "lookups": args.lookups, "median": res, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
