"""``slim-ray distill``: teacher rationales -> fine-tuned student (adapter + merged export).

Steps: build the (p' -> rationale) pairs on the driver (``dataset``), ship them to a Ray Train
``TorchTrainer`` (``train``: DeepSpeed ZeRO or DDP, LoRA or full), export the final checkpoint
(``export``), generate a few held-out rationales beside the teacher's (``evaluate``), and write
``eval.json`` + ``samples.jsonl`` next to the export.

A rerun with the same config and data resumes the same Ray Train run (its name is derived from
both) from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)


def _is_uri(path: str) -> bool:
    return "://" in path


def run_name_for(cfg, data_hash: str) -> str:
    d = cfg.distill
    if d.run_name:
        return d.run_name
    keep = d.model_dump(mode="json", exclude={"num_samples", "sample_max_new_tokens", "export_merged",
                                              "run_name", "storage_path"})
    h = hashlib.sha256(json.dumps([keep, data_hash, cfg.seed], sort_keys=True).encode()).hexdigest()
    return f"distill-{h[:12]}"


def run_distill(cfg) -> dict[str, Any]:
    """Train, export and evaluate the student. Returns the stage summary (with a manifest part)."""
    import ray
    from transformers import AutoTokenizer

    from slim_ray.assets import hash_folder, model_id, resolve_llm
    from slim_ray.distill.dataset import load_dataset
    from slim_ray.distill.evaluate import generate_samples, perplexity
    from slim_ray.distill.export import export_student
    from slim_ray.distill.train import build_trainer
    from slim_ray.runtime import init_ray

    d, lay = cfg.distill, cfg.layout
    t0 = time.time()
    base_path = resolve_llm(d.base_model, cfg.cache_dir)
    tok = AutoTokenizer.from_pretrained(base_path)
    data = load_dataset(cfg, tok, base_path)
    logger.warning("[distill] %d train / %d held-out pairs (%s)", len(data.train), len(data.eval),
                   {k: v for k, v in data.stats.items() if v})

    init_ray(cfg.ray)
    run_name = run_name_for(cfg, data.data_hash)
    out_dir = lay.distill if _is_uri(lay.distill) else os.path.abspath(lay.distill)
    storage = d.storage_path or os.path.join(out_dir, "ray")
    step_log = None if _is_uri(out_dir) else os.path.join(out_dir, "logs", f"{run_name}.jsonl")
    trainer = build_trainer(
        d, seed=cfg.seed, data_ref=ray.put({"train": data.train, "eval": data.eval}),
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        storage_path=storage, run_name=run_name, ray_cfg=cfg.ray, cache_dir=cfg.cache_dir,
        step_log=step_log,
    )
    t_train = time.time()
    result = trainer.fit()
    train_wall = time.time() - t_train
    if result.checkpoint is None:
        raise RuntimeError(f"distill run {run_name} finished without a checkpoint ({storage})")
    m = dict(result.metrics or {})

    t_export = time.time()
    with result.checkpoint.as_directory() as cdir:
        exported = export_student(
            cdir, base_path, d, lay.student_adapter if d.method == "lora" else "",
            lay.student_merged if (d.export_merged or d.method == "full") else "",
        )
    export_s = time.time() - t_export

    samples = []
    if d.num_samples and exported.get("merged"):
        samples = generate_samples(exported["merged"], data.eval[: d.num_samples], d.sample_max_new_tokens,
                                   repetition_penalty=cfg.student.repetition_penalty)
    eval_doc = {
        "eval_loss_before": m.get("eval_loss_before"), "eval_loss_after": m.get("eval_loss_after"),
        "eval_ppl_before": perplexity(m.get("eval_loss_before")),
        "eval_ppl_after": perplexity(m.get("eval_loss_after")),
        "eval_pairs": len(data.eval), "eval_target_tokens": data.stats["eval_target_tokens"],
        "samples": samples,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(eval_doc, f, indent=2)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")

    manifest = {
        "base_model": model_id(d.base_model), "base_model_path": base_path,
        "base_model_hash": hash_folder(base_path), "adapter_hash": exported.get("adapter_hash"),
        "merged_hash": exported.get("merged_hash"), "data_hash": data.data_hash,
        "prompt_version": data.prompt_version, "eval_loss": m.get("eval_loss_after"),
    }
    return {
        "run_name": run_name, "storage_path": storage, "checkpoint": result.checkpoint.path,
        "strategy": d.strategy, "zero_stage": d.zero_stage if d.strategy == "deepspeed" else None,
        "method": d.method, "num_workers": d.num_workers, "data": data.stats,
        "steps": m.get("steps"), "train_loss": m.get("train_loss"),
        "eval_loss_before": m.get("eval_loss_before"), "eval_loss_after": m.get("eval_loss_after"),
        "eval_ppl_before": perplexity(m.get("eval_loss_before")),
        "eval_ppl_after": perplexity(m.get("eval_loss_after")),
        "trainable_params": m.get("trainable_params"), "tokens_per_s": m.get("tokens_per_s"),
        "peak_rss_mb_max": m.get("peak_rss_mb_max"), "bf16": m.get("bf16"),
        "train_wall_s": round(train_wall, 1), "export_s": round(export_s, 1),
        "total_s": round(time.time() - t0, 1), "adapter": exported.get("adapter"),
        "merged": exported.get("merged"), "manifest": manifest, "num_samples": len(samples),
    }
