"""Distillation throughput and memory: DDP vs DeepSpeed ZeRO-2 vs ZeRO-3, LoRA and full fine-tune.

A packaged student (SmolLM2-135M-Instruct by default; ``--model qwen2.5-coder-0.5b-instruct`` for
the 0.63B-parameter Qwen) on the same (student prompt -> teacher rationale) pairs, 2 Ray Train
workers (1 CPU each), the same number of optimizer steps and the same global batch everywhere;
plus the single-process Hugging Face ``Trainer`` (all CPUs, same global batch) as the reference.
Setup ``ddp-1worker`` (one DDP worker, half the global batch) gives DDP's per-worker memory when
two DDP workers do not fit the machine together.
Printed side by side in one run:

- tokens/s: non-padding tokens trained per second of the loop, after the first step (steady
  state), summed over workers;
- peak RSS per worker (max over workers) and its growth over the process at loop start
  (model + optimizer + activations; the rest is the Python/torch/Ray baseline);
- the peak summed PSS of this process and every Ray process it started (sampled outside the
  workers, so a setup that does not fit still has a figure: Ray's memory monitor kills a worker
  when the machine's memory runs out, and the row says so).

    .venv/bin/python bench/distill.py [--run-dir runs/shared-ml100k] [--steps 8] [--only lora]
    .venv/bin/python bench/distill.py --run-dir runs/effect --model qwen2.5-coder-0.5b-instruct --only full \
        --setups zero3,zero2,ddp-1worker,ddp,zero3-offload --steps 3 --samples 32 --max-length 256 \
        --batch-size 1 --no-hf

Data: the run's teacher rationales when present, else rationale-shaped text built from the real
MovieLens-100K histories of the prepared run (``slim-ray prepare`` output).
"""

from __future__ import annotations

from slim_ray.runtime import pin_loopback

pin_loopback()  # before anything imports Ray: a local Ray listens on 127.0.0.1 only

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_data(run_dir: str, model: str, max_length: int, n: int, seed: int = 0):
    """Pairs from the run's teacher rationales, or synthetic rationales over real histories."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from slim_ray import storage
    from slim_ray.assets import resolve_llm
    from slim_ray.data.io import read_items, read_rationales, read_sequences
    from slim_ray.data.schemas import RATIONALES_SCHEMA
    from slim_ray.distill.dataset import build_dataset
    from slim_ray.layout import RunLayout

    lay = RunLayout(run_dir)
    tok = AutoTokenizer.from_pretrained(resolve_llm(model))
    items, seqs = read_items(lay.items), read_sequences(lay.sequences)
    teacher = lay.rationales("teacher")
    rats = read_rationales(teacher) if storage.exists(teacher) else None
    source = "teacher rationales"
    if rats is None or rats.num_rows == 0:
        source = "synthetic rationales over real histories"
        titles = {r["item_id"]: r for r in items.select(["item_id", "title", "categories"]).to_pylist()}
        rows = []
        for r in seqs.slice(0, n).to_pylist():
            plen = len(r["item_ids"]) - 2
            last = titles[r["item_ids"][plen - 1]]
            genre = (last["categories"] or ["Drama"])[0]
            text = (f"Step 1: The user enjoys {genre} movies such as {last['title']}.\n"
                    f"Step 2: Recommend {genre} and related genres.\n"
                    f"Step 3: Recommend well-reviewed {genre} movies similar to {last['title']}.")
            rows.append({"rationale_key": f"b{r['user_id']}", "user_id": r["user_id"], "role": "teacher",
                         "model": "bench", "prompt_version": "bench", "prefix_len": plen, "prompt": "",
                         "text": text, "step1": "", "step2": "", "step3": "", "n_prompt_tokens": 0,
                         "n_output_tokens": 0, "error": None})
        rats = pa.Table.from_pylist(rows, schema=RATIONALES_SCHEMA)
    from slim_ray.prompts import load_template, DEFAULT_TEMPLATE, student_messages

    def p_prime(history):  # the student prompt with the 10 most recent movies
        return student_messages(history, item_noun="movies", category_label="genres", max_items=10)

    data = build_dataset(rats, seqs, items, tok, max_length=max_length, eval_fraction=0.0,
                         min_eval_users=0, seed=seed, max_samples=n,
                         prompt_builder=(p_prime, load_template(DEFAULT_TEMPLATE["student"]).version))
    return data, tok, source


SETUPS = {
    "ddp": {"strategy": "ddp"},
    # DDP keeps a whole replica per worker, so one worker alone needs what each of two needs: its
    # peak is DDP's per-worker figure when two DDP workers do not fit the machine together.
    "ddp-1worker": {"strategy": "ddp", "num_workers": 1},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3-offload": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
}


def ray_run(name: str, overrides: dict, data, pad_id: int, steps: int, storage: str, batch_size: int = 2) -> dict:
    """One setup; a setup that fails (out of memory) returns its error and the memory it reached."""
    import ray

    from slim_ray.distill.config import DistillConfig
    from slim_ray.distill.train import build_trainer
    from slim_ray.scale.monitor import TreeMonitor

    d = DistillConfig(**{"num_workers": 2, **overrides}, batch_size=batch_size, grad_accum=1, max_steps=steps,
                      checkpoint_every=10**6, max_failures=0)
    t0 = time.time()
    mon = TreeMonitor(os.getpid(), every=0.5)
    mon.start()
    try:
        trainer = build_trainer(d, seed=0, data_ref=ray.put({"train": data.train, "eval": []}), pad_id=pad_id,
                                storage_path=storage, run_name=f"bench-{name}-{uuid.uuid4().hex[:6]}",
                                save_final=False)
        m = dict(trainer.fit().metrics, error=None)
    except Exception as e:  # the row records why (e.g. a worker killed by Ray's memory monitor)
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        m = {"error": f"{type(e).__name__}: {next((ln for ln in lines if 'memory' in ln.lower()), lines[0] if lines else '')}"[:300]}
    finally:
        mon.stop()
    m["wall_s"] = time.time() - t0
    m["tree_peak_pss_mib"] = mon.figures()["tree_pss_mib"]
    return m


def hf_child(method: str, model_name: str, steps: int, path: str, threads: int) -> None:
    """Runs in a fresh process: HF Trainer, 1 process, batch 4 (= 2 workers x 2), bf16 autocast."""
    import pickle

    import torch
    from transformers import Trainer, TrainingArguments

    sys.path.insert(0, os.path.dirname(HERE))
    from slim_ray.assets import resolve_llm
    from slim_ray.distill.dataset import collate
    from slim_ray.distill.train import PeakMemory, build_model

    with open(path, "rb") as f:
        payload = pickle.load(f)
    examples, pad_id = payload["train"], payload["pad_id"]
    torch.set_num_threads(threads)
    mem = PeakMemory().start()
    d = {"method": method, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
         "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    model, _ = build_model(resolve_llm(model_name), d)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    tokens = []

    def collator(batch):
        out = collate(batch, pad_id)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hfbench_"), per_device_train_batch_size=4, max_steps=steps,
        learning_rate=2e-4, bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=0,
    )
    times = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.time())

    trainer = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collator, callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    mem.stop()
    steady = sum(tokens[1:len(times)]) / max(times[-1] - times[0], 1e-9) if len(times) > 1 else None
    print("HFRESULT " + json.dumps({
        "tokens_per_s_steady": steady, "tokens_per_s": sum(tokens[:len(times)]) / (time.time() - t0),
        "peak_rss_mb_max": mem.peak_mb, "rss_base_mb": mem.base / 2**20, "world_size": 1,
    }), flush=True)


def hf_run(method: str, model: str, data, pad_id: int, steps: int, threads: int = 2) -> dict:
    import pickle

    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump({"train": data.train, "pad_id": pad_id}, f)
    t0 = time.time()
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-child", method, "--model", model,
                          "--steps", str(steps), "--payload", f.name, "--hf-threads", str(threads)],
                         capture_output=True, text=True, env=env)
    os.unlink(f.name)
    for line in out.stdout.splitlines():
        if line.startswith("HFRESULT "):
            m = json.loads(line[len("HFRESULT "):])
            m["wall_s"] = time.time() - t0
            return m
    raise RuntimeError(f"HF Trainer child failed:\n{out.stderr[-3000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/shared-ml100k")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--only", choices=["lora", "full"], default=None)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a packaged LLM name or a local HF folder")
    p.add_argument("--setups", default="ddp,zero2,zero3", help=f"comma-separated, of {','.join(SETUPS)}")
    p.add_argument("--no-hf", action="store_true", help="skip the single-process HF Trainer reference")
    p.add_argument("--hf-threads", type=int, default=2, help="torch threads of the HF Trainer process "
                   "(default 2 = the CPUs the 2 Ray workers get together)")
    p.add_argument("--batch-size", type=int, default=2, help="micro-batch per Ray Train worker (the HF "
                   "Trainer reference keeps batch 4, so compare its tokens/s at the default only)")
    p.add_argument("--mmap-threshold", type=int, default=1 << 20,
                   help="glibc MALLOC_MMAP_THRESHOLD_ of the Ray processes in bytes (0: glibc's own, "
                   "dynamic). Fixed at 1 MiB, every large tensor is its own mapping, returned on free: "
                   "with the dynamic threshold a 0.63B full fine-tune's freed buffers stayed in the "
                   "heap and each worker's RSS kept growing")
    p.add_argument("--hf-child", choices=["lora", "full"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hf_child:
        hf_child(a.hf_child, a.model, a.steps, a.payload, a.hf_threads)
        return 0

    from slim_ray.runtime import RayConfig, init_ray

    setups = [s for s in a.setups.split(",") if s]
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        p.error(f"unknown setups {unknown}; choose from {sorted(SETUPS)}")
    data, tok, source = bench_data(a.run_dir, a.model, a.max_length, a.samples)
    print(f"model {a.model}; data: {len(data.train)} pairs ({source}), {data.stats['train_tokens']} tokens, "
          f"max_length {a.max_length}; {a.steps} steps x batch {a.batch_size} per worker; "
          f"MALLOC_MMAP_THRESHOLD_ {a.mmap_threshold or 'glibc default'}", flush=True)
    import ray

    storage = tempfile.mkdtemp(prefix="bench_distill_")
    rows = []
    for method in ["lora", "full"]:
        if a.only and method != a.only:
            continue
        for name in setups:
            print(f"-- {method} {name}", flush=True)
            # A fresh local Ray per setup: one that ran out of memory leaves nothing behind for the
            # next (its placement group, dying workers), and each starts from the same baseline.
            env = {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold else {}
            init_ray(RayConfig(num_cpus=2, env_vars=env))
            try:
                m = ray_run(f"{method}-{name}", {"method": method, "base_model": a.model, **SETUPS[name]}, data,
                            tok.pad_token_id, a.steps, storage, a.batch_size)
            finally:
                ray.shutdown()
            print(json.dumps({"method": method, "setup": name, **m}), flush=True)
            workers = SETUPS[name].get("num_workers", 2)
            rows.append((method, f"{name} ({workers} worker{'s' if workers > 1 else ''})", m))
        if not a.no_hf:
            print(f"-- {method} HF Trainer", flush=True)
            rows.append((method, f"HF Trainer (1 process, {a.hf_threads} threads)",
                         hf_run(method, a.model, data, tok.pad_token_id, a.steps, a.hf_threads)))
    print()
    print(table(rows))
    return 0


def table(rows: list[tuple[str, str, dict]]) -> str:
    """The markdown table; tokens/s relative to the HF Trainer row of the same method when there is one."""
    out = ["| method | setup | tokens/s | x HF Trainer | peak RSS/worker MiB | growth MiB | Ray tree peak PSS MiB | wall s | result |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, setup, m in rows:
        ref = next((r for mm, s, r in rows if mm == method and s.startswith("HF")), None)
        tree = m.get("tree_peak_pss_mib")
        tree_s = f"{tree:,.0f}" if tree is not None else "–"
        if m.get("error"):
            out.append(f"| {method} | {setup} | – | – | – | – | {tree_s} | {m['wall_s']:.0f} | failed: {m['error']} |")
            continue
        tps = m.get("tokens_per_s_steady") or m.get("tokens_per_s")
        rtps = ref and (ref.get("tokens_per_s_steady") or ref.get("tokens_per_s"))
        ratio = f"{tps / rtps:.2f}" if rtps else "–"
        out.append(f"| {method} | {setup} | {tps:.0f} | {ratio} | {m['peak_rss_mb_max']:,.0f} | "
                   f"{m['peak_rss_mb_max'] - m['rss_base_mb']:,.0f} | {tree_s} | {m['wall_s']:.0f} | ok |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
