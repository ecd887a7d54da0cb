"""Bounded HTTP load on the serving graph (loopback): latency, throughput, errors and replica
counts at 1, 8, 16 and 32 concurrent clients, beside the bare in-process scorer call for the same
requests, so the serving overhead is a ratio from the same run.

    .venv/bin/python bench/serve_load.py --run-dir runs/demo                # a finished run folder
    .venv/bin/python bench/serve_load.py --build-run runs/serve-bench       # build one (see below)
    .venv/bin/python bench/serve_load.py --build-run runs/serve-bench --reasoner --soak-s 300

Workloads (each a closed loop: every client sends its next request when the last one answered):
- ``known``: ``{"user_id": u, "k": 10}`` over the run's users (stored rationale: one recommender call);
- ``history``: ``{"history": [...], "k": 10}``, the users' own histories sent raw, with the
  reasoner off (the run's learned no-rationale vector);
- ``student`` (``--reasoner``): raw histories through the student reasoner, at 1 and 4 clients,
  after one ``explain: true`` sample response for a known user and for a raw history.
Autoscaling is min 1 / max 2 replicas per deployment (the config's defaults); ``replicas`` is the
most replicas seen per deployment during the level (sampled each second from ``serve.status()``).
``in ingress`` is the ingress's own ``timings_ms.total_ms`` and ``recommender call`` its
``recommend_ms`` (the rest of the p50 is the HTTP proxy, the client and queueing before the
ingress). ``bare p50`` is ``Recommender.answer_many([request])`` in this process (the deployment's own code,
no Ray, no HTTP) on the same requests; ``overhead`` = served p50 at 1 client minus bare p50.
``--soak-s`` runs 16 ``known`` clients that long and reports errors, the most replicas, and the RSS
of each Serve process at its start and end.

``--build-run DIR`` makes a run folder in minutes: ``slim-ray prepare`` of the config's data,
item vectors from the configured encoder, a *templated* stored rationale per user ("the user
recently watched <last three titles>", encoded like a real one), and a SASRec ``slim:student``
checkpoint of the configured size with untrained weights. Latency does not depend on the weights
or on what the rationale says; ranking quality here means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

import numpy as np

from slim_ray.runtime import pin_loopback

pin_loopback()  # before anything imports ray


def build_run(cfg) -> None:
    """Prepared data, item vectors, templated user rationales and an untrained checkpoint."""
    import pyarrow as pa

    from slim_ray import storage
    from slim_ray.data.schemas import RATIONALES_SCHEMA
    from slim_ray.encode import store
    from slim_ray.encode.encoder import EncoderSpec, encode_texts
    from slim_ray.rec.checkpoint import is_finished, write_run
    from slim_ray.rec.train import build_model, load_data, run_spec
    from slim_ray.stages import run_stage

    lay = cfg.layout
    run_stage("prepare", cfg)
    items = storage.read_table(lay.items, columns=["item_id", "title", "text"])
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    spec = EncoderSpec.from_config(cfg.encode)

    def write_vectors(folder, kind, ids, texts):
        if storage.list_files(folder, suffix=".parquet"):
            return
        vecs = encode_texts(texts, dtype=cfg.encode.dtype)
        store.write_part(pa.Table.from_arrays([
            pa.array(ids, pa.int64()), pa.array([kind] * len(ids)), pa.array([spec.model_id] * len(ids)),
            pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1]),
            pa.array([spec.key(t) for t in texts]),
        ], schema=store.output_schema(vecs.shape[1])), folder)

    print("[bench] item vectors", flush=True)
    write_vectors(lay.item_embeddings, "item", items.column("item_id").to_pylist(), items.column("text").to_pylist())
    seq = storage.read_table(lay.sequences, columns=["user_id", "item_ids"])
    users = seq.column("user_id").to_pylist()
    texts = [f"Step 1: the user recently watched {', '.join(titles[i] for i in h[-5:-2])}."
             for h in seq.column("item_ids").to_pylist()]
    print("[bench] templated user rationales", flush=True)
    write_vectors(lay.user_embeddings("student"), "user", users, texts)
    if not storage.list_files(lay.rationales("student"), suffix=".parquet"):
        row = {c: [None] * len(users) for c in RATIONALES_SCHEMA.names}
        row.update(rationale_key=[f"bench-{u}" for u in users], user_id=users, role=["student"] * len(users),
                   prefix_len=[0] * len(users), text=texts)
        storage.makedirs(lay.rationales("student"))
        storage.write_table(pa.Table.from_pydict(row, schema=RATIONALES_SCHEMA),
                            storage.join(lay.rationales("student"), "part-0.parquet"))
    run = lay.rec_run("sasrec", "slim", 0, "student")
    if not is_finished(run):
        import torch

        rspec = run_spec(cfg, "sasrec", "slim", "student", 0)
        torch.manual_seed(0)
        data = load_data(rspec)
        model, _ = build_model(rspec, data)
        meta = {**{k: rspec.get(k) for k in ("backbone", "mode", "role", "variant", "seed", "hp", "fingerprint",
                                             "missing_rationale", "max_users")},
                "best_valid_ndcg@10": 0.0, "n_items": data.n_items, "max_user_id": data.n_users,
                "note": "untrained weights written by bench/serve_load.py"}
        write_run(run, model.state_dict(), meta)


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


class ReplicaSampler(threading.Thread):
    """Most running replicas per deployment seen since the last ``take()`` (``serve.status()``, 1 Hz)."""

    def __init__(self, app: str):
        super().__init__(daemon=True)
        self.app, self.stop, self.seen, self.lock = app, threading.Event(), {}, threading.Lock()

    def run(self):
        from ray import serve

        while not self.stop.is_set():
            try:
                deps = serve.status().applications[self.app].deployments
                with self.lock:
                    for name, d in deps.items():
                        n = d.replica_states.get("RUNNING", 0)
                        self.seen[name] = max(self.seen.get(name, 0), n)
            except Exception:
                pass
            self.stop.wait(1.0)

    def take(self) -> dict:
        with self.lock:
            out, self.seen = dict(self.seen), {}
        return out


def load(url: str, bodies: list[dict], clients: int, seconds: float, headers: dict) -> dict:
    """A closed loop of ``clients`` threads for ``seconds``: latencies of answered requests, errors."""
    import httpx

    lat, errors, lock, inner = [], {}, threading.Lock(), {"total_ms": [], "recommend_ms": []}
    stop_at = time.perf_counter() + seconds

    def worker(n: int):
        rnd = random.Random(n)
        with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
            while time.perf_counter() < stop_at:
                body = bodies[rnd.randrange(len(bodies))]
                t = time.perf_counter()
                try:
                    r = c.post("/v1/recommend", json=body)
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t
                with lock:
                    if code == 200:
                        lat.append(dt)
                        t_ms = r.json()["timings_ms"]
                        for key in inner:
                            inner[key].append(t_ms.get(key, 0.0))
                    else:
                        errors[str(code)] = errors.get(str(code), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat) + sum(errors.values()), "qps": len(lat) / wall,
            "p50_ms": 1000 * pct(lat, 50), "p95_ms": 1000 * pct(lat, 95), "p99_ms": 1000 * pct(lat, 99),
            "errors": errors, "ingress_p50_ms": pct(inner["total_ms"], 50),
            "recommender_call_p50_ms": pct(inner["recommend_ms"], 50)}


def bare_p50(rec, bodies: list[dict], n: int = 300) -> float:
    """The deployment's own code in this process, one request at a time (no Ray, no HTTP)."""
    rnd = random.Random(0)
    times = []
    for _ in range(n):
        b = bodies[rnd.randrange(len(bodies))]
        req = {"user_id": b.get("user_id"), "history": b.get("history"), "k": b["k"], "explain": False,
               "student": False}
        t = time.perf_counter()
        rec.answer_many([req])
        times.append(time.perf_counter() - t)
    return 1000 * pct(times[20:], 50)


def serve_rss_mb() -> dict:
    """RSS in MiB of this Ray's Serve processes (controller, proxy, replicas), by process, and the sum."""
    import psutil
    import ray

    out: dict = {}
    for infos in ray._private.worker._global_node.all_processes.values():
        for info in infos:
            try:
                for p in psutil.Process(info.process.pid).children(recursive=True):
                    cmd = " ".join(p.cmdline())
                    if any(k in cmd for k in ("ServeReplica", "ServeController", "ProxyActor")):
                        out[f"{p.name()}:{p.pid}"] = round(p.memory_info().rss / 2**20, 1)
            except Exception:
                pass
    out["total"] = round(sum(out.values()), 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    p.add_argument("--run-dir", help="a finished run folder to serve")
    p.add_argument("--build-run", metavar="DIR", help="build a bench run folder there first (see above)")
    p.add_argument("--clients", default="1,8,16,32")
    p.add_argument("--seconds", type=float, default=20.0, help="per level")
    p.add_argument("--reasoner", action="store_true", help="also the student workload (1 and 4 clients)")
    p.add_argument("--soak-s", type=float, default=0.0)
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    from ray import serve

    from slim_ray.config import load_config
    from slim_ray.serve.app import deploy, start, stop
    from slim_ray.serve.recommender import Recommender

    if not args.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    run_dir = args.build_run or args.run_dir
    if not run_dir:
        p.error("give --run-dir or --build-run")
    overrides = [f"run_dir={run_dir}", f"serve.port={args.port}", "serve.log_level=WARNING", *args.set]
    cfg = load_config(args.config, overrides + ["serve.reasoner=false"])
    if args.build_run:
        build_run(cfg)
    url = start(cfg)
    headers = {"x-api-key": os.environ[cfg.serve.api_key_env]} if os.environ.get(cfg.serve.api_key_env) else {}
    sampler = ReplicaSampler(cfg.serve.app_name)
    sampler.start()
    rec = Recommender(cfg)
    users = sorted(rec.catalog.histories)
    workloads = {
        "known": [{"user_id": u, "k": 10} for u in users],
        "history": [{"history": rec.catalog.histories[u], "k": 10} for u in users],
    }
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    try:
        for name, bodies in workloads.items():
            load(url, bodies, 4, 3.0, headers)  # warm up
            bare = bare_p50(rec, bodies)
            for c in levels:
                sampler.take()
                r = {"workload": name, **load(url, bodies, c, args.seconds, headers), "bare_p50_ms": bare,
                     "replicas": sampler.take()}
                rows.append(r)
                print(json.dumps(r), flush=True)
        soak = None
        if args.soak_s:
            rss0 = serve_rss_mb()
            sampler.take()
            soak = {**load(url, workloads["known"], 16, args.soak_s, headers), "rss_start_mb": rss0,
                    "rss_end_mb": serve_rss_mb(), "seconds": args.soak_s, "replicas": sampler.take()}
            print(json.dumps({"soak": soak}), flush=True)
        samples = []
        if args.reasoner:
            import httpx

            deploy(load_config(args.config, overrides))
            u = users[0]
            for body in ({"user_id": u, "k": 5, "explain": True},
                         {"history": rec.catalog.histories[u][-5:], "k": 5, "explain": True}):
                r = httpx.post(f"{url}/v1/recommend", json=body, headers=headers, timeout=300)
                samples.append({"request": body, "status": r.status_code, "response": r.json()})
                print(json.dumps(samples[-1]), flush=True)
            for c in (1, 4):
                sampler.take()
                r = {"workload": "student", **load(url, workloads["history"], c, args.seconds, headers),
                     "bare_p50_ms": float("nan"), "replicas": sampler.take()}
                rows.append(r)
                print(json.dumps(r), flush=True)
    finally:
        sampler.stop.set()
        stop(cfg)

    print(f"\nrun {run_dir}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {args.seconds:.0f} s per level\n")
    print("| workload | clients | QPS | p50 ms | p95 ms | p99 ms | errors | in ingress p50 ms | recommender call p50 ms "
          "| bare p50 ms | replicas (max) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        reps = ", ".join(f"{k.replace('Deployment', '')} {v}" for k, v in sorted(r["replicas"].items()))
        print(f"| {r['workload']} | {r['clients']} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {sum(r['errors'].values()) or 0} | {r['ingress_p50_ms']:.1f} | "
              f"{r['recommender_call_p50_ms']:.1f} | {r['bare_p50_ms']:.2f} | {reps} |")
    for name in workloads:
        one = next((r for r in rows if r["workload"] == name and r["clients"] == 1), None)
        many = next((r for r in rows if r["workload"] == name and r["clients"] == 16), None)
        if one:
            print(f"{name}: overhead at 1 client {one['p50_ms'] - one['bare_p50_ms']:.1f} ms (p50 served - bare)"
                  + (f"; QPS 16 / QPS 1 = {many['qps'] / one['qps']:.2f}" if many else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "soak": soak, "samples": samples, "config": overrides}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
