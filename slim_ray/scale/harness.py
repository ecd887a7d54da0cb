"""`slim-ray bench scale`: every stage of the pipeline measured at several numbers of users.

    slim-ray bench scale --users 10000,100000,1000000 [--out runs/bench-scale] [--address ray://...]

For each size N: ``slim-ray synth`` writes an Amazon-format log of N users (a fixed catalogue, so
per-user work does not grow with N), then each stage runs as its own ``slim-ray <stage>`` process
over one run folder: prepare, teach (a fixed sample of users), reason (every user), encode, train
(a fixed number of steps, users through Ray Data), evaluate, and a serve warm-up (``slim-ray serve`` until ready, a few requests, stop).
Distillation is left out: its cost depends on the teacher sample, not on N (bench/distill.py).

The LLM stages use the ``openai`` engine against the stand-in server (slim_ray/scale/standin.py)
on 127.0.0.1: a million real rationales need a GPU fleet, so at these sizes the figures of teach
and reason measure our orchestration, and every table that shows them says so.

Per stage and size it records wall seconds, rows and rows/s, CPU seconds and peak memory of the
stage's process tree (slim_ray/scale/monitor.py: the driver's RSS; with a local Ray the summed
PSS of the driver and every Ray process), the peak size of Ray's object-spilling folder, and the
bytes and file count of the stage's output. Results go to ``<out>/results.json`` (merged across
invocations, so sizes can be added later) and to ``BENCHMARKS.md``-style markdown with two plots.

``--kill-reason`` additionally SIGKILLs the reason stage's whole process tree when the stand-in
has answered about half the users, reruns the stage, and records whether the folder ends with
exactly one row per user and no duplicate key.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional

from slim_ray.scale.monitor import TreeMonitor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "scale.yaml")
STAGES = ["synth", "prepare", "teach", "reason", "encode", "train", "evaluate", "serve"]
STAND_IN_NOTE = "LLM stand-in (slim_ray/scale/standin.py): orchestration only, no model"


def slim_ray_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "slim-ray")
    return exe if os.path.exists(exe) else "slim-ray"


def command_env(extra: Optional[dict] = None) -> dict[str, str]:
    """A user's shell environment (no test-only Ray settings), offline Hugging Face. Ray's token
    settings (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``) are kept: a stage that
    joins a cluster with token auth (``--address``) needs them."""
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith(("RAY_", "PYTEST")) or k.startswith("RAY_AUTH_")) and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------- the stand-in


class StandInProcess:
    """The stand-in server as a child process (its CPU is not the stage's), stopped by PID."""

    def __init__(self, work: str, latency_ms: float, words: int):
        ready = os.path.join(work, "standin.json")
        if os.path.exists(ready):
            os.remove(ready)
        self.log = open(os.path.join(work, "standin.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slim_ray.scale.standin", "--latency-ms", str(latency_ms), "--words", str(words),
             "--ready-file", ready], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=command_env())
        deadline = time.time() + 60
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the stand-in server did not start; see {self.log.name}")
            time.sleep(0.1)
        self.url = json.load(open(ready))["url"]

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------- one stage


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (children first seen, then the root)."""
    for p in reversed(_descendants(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_measured(args: list[str], log_path: str, spill_dir: str, env: Optional[dict] = None,
                 until=None) -> dict[str, Any]:
    """Run ``slim-ray <args>`` under a TreeMonitor. ``until(proc)``: polled every 0.5 s; when it
    returns True the process tree is SIGKILLed (a crash on purpose)."""
    os.makedirs(spill_dir, exist_ok=True)
    t0 = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([slim_ray_exe(), *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=command_env(dict(env or {}, RAY_object_spilling_directory=spill_dir)))
        mon = TreeMonitor(proc.pid, spill_dir=spill_dir)
        mon.start()
        killed = False
        while proc.poll() is None:
            if until is not None and not killed and until(proc):
                mon.sample()
                kill_tree(proc.pid)
                killed = True
            time.sleep(0.5)
        mon.stop()
    return dict(rc=proc.returncode, wall_s=round(time.time() - t0, 2), killed=killed, **mon.figures())


def output_listing(uri: str) -> dict[str, int]:
    from slim_ray import storage

    if not storage.exists(uri):
        return {"output_bytes": 0, "output_files": 0}
    files = storage.tree_listing(uri)
    return {"output_bytes": int(sum(f[1] for f in files)), "output_files": len(files)}


# ---------------------------------------------------------------------------- one size


class SizeRun:
    """The stages of one size N over ``<out>/<N>/``."""

    def __init__(self, out: str, n_users: int, stand_in: StandInProcess, address: Optional[str],
                 extra_sets: list[str]):
        from slim_ray.config import load_config

        self.n = n_users
        self.work = os.path.join(out, str(n_users))
        os.makedirs(self.work, exist_ok=True)
        synth = os.path.join(self.work, "synth")
        self.sets = [f"run_dir={os.path.join(self.work, 'run')}", f"synth.out={synth}", f"synth.num_users={n_users}",
                     f"data.interactions={os.path.join(synth, 'reviews')}", f"data.items={os.path.join(synth, 'meta')}",
                     f"teacher.base_url={stand_in.url}", f"student.base_url={stand_in.url}"]
        if address:
            self.sets.append(f"ray.address={address}")
        self.sets += extra_sets
        self.cfg = load_config(CONFIG, self.sets)
        self.stand_in = stand_in
        self.log = os.path.join(self.work, "stages.log")

    def args(self, stage: str, *more: str) -> list[str]:
        return [stage, "--config", CONFIG, *more, "--set", *self.sets]

    def _spill(self, stage: str) -> str:
        return os.path.join(self.work, "spill", stage)

    def output_of(self, stage: str) -> Optional[str]:
        lay = self.cfg.layout
        return {"synth": self.cfg.synth.out, "prepare": lay.prepared, "teach": lay.rationales("teacher"),
                "reason": lay.rationales("student"), "encode": lay.embeddings, "train": lay.rec,
                "evaluate": lay.eval}.get(stage)

    def stage(self, name: str) -> dict[str, Any]:
        if name == "serve":
            return self.serve_warmup()
        if name == "synth":
            res = run_measured(["synth", "--config", CONFIG, "--set", *self.sets], self.log, self._spill(name))
        else:  # --force: measured again even when fresh (and train retrains its finished run)
            self._clear_reusable(name)
            more = ["--force"] + (["--set", "rec.force=true"] if name == "train" else [])
            res = run_measured(self.args(name, *more), self.log, self._spill(name))
        if res["rc"] != 0:
            raise RuntimeError(f"{name} at {self.n:,} users failed (exit {res['rc']}); see {self.log}")
        res.update(output_listing(self.output_of(name)))
        res.update(self.rows(name))
        return res

    def _clear_reusable(self, name: str) -> None:
        """Generation resumes from the rows of an earlier run and encode reuses vectors by key: a
        measurement of them starts from an empty output, or it would time the skipping."""
        from slim_ray import storage

        out = self.output_of(name)
        if name in ("teach", "reason", "encode") and out and storage.exists(out):
            storage.delete_dir(out)

    def summary(self, name: str) -> dict[str, Any]:
        from slim_ray.lineage import read_manifest

        return (read_manifest(self.output_of(name)) or {}).get("summary", {})

    def rows(self, name: str) -> dict[str, Any]:
        """The stage's own count of what it produced (its manifest summary), and per-stage extras."""
        if name == "synth":
            s = json.load(open(os.path.join(self.cfg.synth.out, "synth.json")))["summary"]
            return {"rows": s["interactions"], "rows_what": "interactions"}
        s = self.summary(name)
        if name == "prepare":
            return {"rows": s.get("users"), "rows_what": "users", "items": s.get("items"),
                    "interactions": s.get("interactions")}
        if name in ("teach", "reason"):
            return {"rows": s.get("done_rows"), "rows_what": "rationales", "failed_rows": s.get("failed_rows"),
                    "engine_rows_per_s": s.get("rows_per_s"), "note": STAND_IN_NOTE}
        if name == "encode":
            outs = s.get("outputs") or {}
            return {"rows": sum(int(o.get("encoded") or 0) for o in outs.values()), "rows_what": "texts encoded",
                    "encoder_rows_per_s": (s.get("job") or {}).get("encoder_rows_per_s")}
        if name == "train":
            return self._train_rows()
        if name == "evaluate":
            return {"rows": s.get("num_users"), "rows_what": "users", "shards": s.get("shards")}
        return {}

    def _train_rows(self) -> dict[str, Any]:
        """Seconds per step and examples/s of the (single) run over its epochs (``rec.max_steps`` in
        all), and the workers' peak RSS, from its meta.json."""
        from slim_ray import storage
        from slim_ray.rec.checkpoint import finished_runs, read_meta

        runs = finished_runs(self.cfg.layout.rec)
        meta = read_meta(runs[0]) if runs else None
        if not meta:
            return {}
        hist = meta.get("history") or []
        train_s = float(sum(meta.get("epoch_seconds") or [0]))
        steps = sum(int(h.get("steps") or 0) for h in hist)
        examples = sum(int(h.get("examples") or 0) for h in hist)
        out = {"rows": meta.get("n_users"), "rows_what": "users", "train_s": round(train_s, 2),
               "loss": meta.get("loss"), "workers": meta.get("world_size"), "ingest": meta.get("ingest"),
               "run": storage.basename(runs[0])}
        if steps:
            out["s_per_step"] = round(train_s / steps, 4)
            out["steps"] = steps
        if examples and train_s:
            out["examples_per_s"] = round(examples / train_s, 1)
            out["examples"] = examples
        rss = [h["worker_rss_mib"] for h in hist if h.get("worker_rss_mib")]
        if rss:
            out["worker_rss_mib"] = max(rss)
        return out

    def serve_warmup(self) -> dict[str, Any]:
        """``slim-ray serve`` until it prints ready, 20 known-user requests, then SIGINT."""
        import random

        import httpx

        from slim_ray.scale.standin import free_port

        port = free_port()
        spill = self._spill("serve")
        os.makedirs(spill, exist_ok=True)
        t0 = time.time()
        log = open(self.log, "ab")
        proc = subprocess.Popen([slim_ray_exe(), *self.args("serve", "--port", str(port)),
                                 "serve.reasoner=false"], stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                                stdin=subprocess.DEVNULL, text=True,
                                env=command_env({"RAY_object_spilling_directory": spill}))
        mon = TreeMonitor(proc.pid, spill_dir=spill)
        mon.start()
        ready_s, latencies, errors, replica = None, [], 0, {}
        try:
            for line in proc.stdout:
                if "ready" in line:
                    ready_s = time.time() - t0
                    break
            if ready_s is None:
                raise RuntimeError(f"serve at {self.n:,} users exited before it was ready; see {self.log}")
            users = [int(u) for u in random.Random(0).sample(range(1, self.n // 2), 20)]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                for u in users:
                    t = time.time()
                    r = c.post("/v1/recommend", json={"user_id": u, "k": 10})
                    latencies.append(time.time() - t)
                    errors += r.status_code >= 500
                replica = c.get("/info").json().get("replica") or {}  # the recommender replica's own figures
            mon.sample()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
            mon.stop()
            log.close()
        lat = sorted(latencies)
        return dict(rc=0, wall_s=round(time.time() - t0, 2), ready_s=round(ready_s, 2), rows=len(users),
                    rows_what="requests", server_errors=errors, p50_ms=round(1000 * lat[len(lat) // 2], 1),
                    replica_rss_mib=replica.get("rss_mib"), replica_peak_rss_mib=replica.get("peak_rss_mib"),
                    replica_pss_mib=replica.get("pss_mib"), replica_load_s=replica.get("load_s"),
                    **mon.figures())

    def kill_and_resume_reason(self) -> dict[str, Any]:
        """SIGKILL reason at about half the users, rerun it, count the rows and keys."""
        import pyarrow.compute as pc

        from slim_ray import storage
        from slim_ray.generate.store import pair_hash, part_files

        out = self.output_of("reason")
        self._clear_reusable("reason")
        base = self.stand_in.stats()["completions"]
        half = self.n // 2

        def at_half(_proc) -> bool:
            return self.stand_in.stats()["completions"] - base >= half

        first = run_measured(self.args("reason"), self.log, self._spill("reason-killed"), until=at_half)
        rows_after_kill = sum(storage.read_parquet_file(f, columns=["user_id"]).num_rows for f in part_files(out))
        second = run_measured(self.args("reason"), self.log, self._spill("reason-resumed"))
        # A row is identified by (user_id, rationale_key): two users with the same history prefix
        # get the same prompt, hence the same key, and each needs its row.
        pairs, users, rows = set(), set(), 0
        for f in part_files(out):
            t = storage.read_parquet_file(f, columns=["user_id", "rationale_key", "error"])
            t = t.filter(pc.is_null(t["error"]))
            rows += t.num_rows
            pairs.update(pair_hash(t["user_id"].to_pylist(), t["rationale_key"].to_pylist()).tolist())
            users.update(t["user_id"].to_pylist())
        s = self.summary("reason")
        return {"killed": first["killed"], "killed_after_s": first["wall_s"], "rows_kept_after_kill": rows_after_kill,
                "resumed_wall_s": second["wall_s"], "resumed_rc": second["rc"], "rows": rows,
                "distinct_pairs": len(pairs), "distinct_users": len(users), "users_selected": s.get("users_selected"),
                "duplicates": rows - len(pairs), "skipped_already_done": s.get("skipped_already_done"),
                "note": STAND_IN_NOTE}


# ---------------------------------------------------------------------------- a real engine

# The figure a GPU fleet estimate assumes, and where it comes from.
PAPER_A100_S_PER_RATIONALE = 6.11  # SLIM (arXiv 2403.04260), its cost comparison: one student rationale on one A100


def real_engine(out: str, engine: str = "hf", users: int = 16, new_tokens: int = 32) -> dict[str, Any]:
    """A real LLM on this machine at demo scale (MovieLens-100K slice, the packaged SmolLM2-135M),
    measured in the same bench run, so the stand-in's figures stand beside a real engine's."""
    work = os.path.join(out, f"real-{engine}")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "stages.log")
    sets = [f"run_dir={os.path.join(work, 'run')}", "data.max_users=200", f"teacher.engine={engine}",
            "teacher.model=smollm2-135m-instruct", f"teacher.num_users={users}", f"teacher.max_new_tokens={new_tokens}",
            f"teacher.min_new_tokens={new_tokens}", "teacher.num_workers=1", "teacher.batch_size=8",
            "ray.include_dashboard=false"]
    for stage in ("prepare", "teach"):
        res = run_measured([stage, "--force", "--set", *sets], log, os.path.join(work, "spill", stage))
        if res["rc"] != 0:
            raise RuntimeError(f"real-engine {stage} failed (exit {res['rc']}); see {log}")
    from slim_ray.lineage import read_manifest

    s = read_manifest(os.path.join(work, "run", "rationales", "teacher"))["summary"]
    return {"engine": engine, "model": s.get("model_id"), "rows": s.get("done_rows"), "wall_s": res["wall_s"],
            "generation_s": s.get("generation_seconds"), "output_tokens": s.get("output_tokens"),
            "output_tokens_per_s": s.get("output_tokens_per_s"), "replicas": 1, "cpus_per_replica": 1}


def fleet_estimate(users: int, real: Optional[dict[str, Any]], new_tokens: int = 64) -> dict[str, Any]:
    """users x tokens / (tokens/s per replica), for this machine's replica and for A100s."""
    out = {"users": users, "new_tokens": new_tokens,
           "a100_s_per_rationale": PAPER_A100_S_PER_RATIONALE,
           "a100_source": "SLIM, Wang et al., WWW 2024 (arXiv 2403.04260): 6.11 s per student rationale on one A100",
           "a100_gpu_hours": round(users * PAPER_A100_S_PER_RATIONALE / 3600, 1)}
    if real and real.get("output_tokens_per_s"):
        out["cpu_replica_tokens_per_s"] = real["output_tokens_per_s"]
        out["cpu_replica_hours"] = round(users * new_tokens / real["output_tokens_per_s"] / 3600, 1)
    return out


# ---------------------------------------------------------------------------- the whole bench


def machine_stamp() -> dict[str, Any]:
    import psutil

    return {"host": platform.node(), "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_bench(sizes: list[int], out: str, stages: list[str], address: Optional[str] = None,
              latency_ms: float = 20.0, words: int = 48, kill_reason: bool = False,
              extra_sets: Optional[list[str]] = None, markdown: Optional[str] = None,
              real: Optional[str] = None, also_outs: tuple[str, ...] = ()) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {"sizes": {}}
    results["machine"] = machine_stamp()
    results["stand_in"] = {"latency_ms": latency_ms, "words": words, "note": STAND_IN_NOTE}
    results["address"] = address  # None: each stage started its own local Ray
    results["sets"] = list(extra_sets or [])  # the --set overrides of the last invocation
    stand_in = StandInProcess(out, latency_ms, words)
    try:
        for n in sizes:
            size = SizeRun(out, n, stand_in, address, list(extra_sets or []))
            rec = results["sizes"].setdefault(str(n), {})
            for name in stages:
                print(f"[bench scale] {n:,} users: {name} ...", flush=True)
                rec[name] = size.stage(name)
                r = rec[name]
                print(f"[bench scale] {n:,} users: {name} {r['wall_s']:.1f}s, driver RSS {r['driver_rss_mib']:.0f} MiB, "
                      f"tree PSS {r['tree_pss_mib']:.0f} MiB, rows {r.get('rows')}", flush=True)
                json.dump(results, open(results_path, "w"), indent=1)
            if kill_reason:
                print(f"[bench scale] {n:,} users: reason killed at half, then resumed ...", flush=True)
                rec["reason_kill_resume"] = size.kill_and_resume_reason()
                print(f"[bench scale] {json.dumps(rec['reason_kill_resume'])}", flush=True)
                json.dump(results, open(results_path, "w"), indent=1)
    finally:
        stand_in.close()
    if real:
        print(f"[bench scale] a real engine at demo scale: {real} ...", flush=True)
        results["real_engine"] = real_engine(out, real)
        results["fleet"] = fleet_estimate(max(int(n) for n in results["sizes"]), results["real_engine"])
        json.dump(results, open(results_path, "w"), indent=1)
    if markdown:
        render(out, markdown, also_outs)
    return results


def render(out: str, markdown: str, also_outs: tuple[str, ...] = ()) -> str:
    """The markdown table of ``<out>/results.json``, with its plots in ``docs/img/scale/`` beside it;
    the results of each of ``also_outs`` (other runs, e.g. with other ``--set`` overrides) follow as
    sections of their own."""
    from slim_ray.scale.report import write_markdown

    def load(folder: str) -> dict[str, Any]:
        return json.load(open(os.path.join(folder, "results.json")))

    plots = os.path.join(os.path.dirname(os.path.abspath(markdown)), "docs", "img", "scale")
    return write_markdown(load(out), markdown, plots, also=[load(o) for o in also_outs])
