"""``slim-ray distill``: teacher rationales -> fine-tuned student (adapter + merged export).

Steps: build the (p' -> rationale) pairs in a Ray task (``dataset``; the driver gets counts and
the few held-out pairs it samples, the pairs go to the workers through the object store), train
with a Ray Train ``TorchTrainer`` (``train``: DeepSpeed ZeRO or DDP, LoRA or full), export the
final checkpoint (``export``), generate a few held-out rationales beside the teacher's
(``evaluate``), and write ``eval.json`` + ``samples.jsonl`` next to the export.

Everything lands in the run folder through ``slim_ray.storage``, so ``run_dir`` may be a URI:
Ray Train's storage is ``<run_dir>/distill/ray`` (``RunConfig(storage_path, storage_filesystem)``
from the same resolution), the exports are written locally and copied up.

A rerun with the same config and data resumes the same Ray Train run (its name is derived from
both) from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any

from slim_ray import storage

logger = logging.getLogger(__name__)


def run_name_for(cfg, data_hash: str) -> str:
    d = cfg.distill
    if d.run_name:
        return d.run_name
    keep = d.model_dump(mode="json", exclude={"num_samples", "sample_max_new_tokens", "export_merged",
                                              "run_name", "storage_path"})
    h = hashlib.sha256(json.dumps([keep, data_hash, cfg.seed], sort_keys=True).encode()).hexdigest()
    return f"distill-{h[:12]}"


def _build_data(cfg, tokenizer_path: str, num_samples: int):
    """Ray task: the distillation pairs. Returns (small info for the driver, {"train", "eval"})."""
    import ray
    from transformers import AutoTokenizer

    from slim_ray.distill.dataset import load_dataset

    data = load_dataset(cfg, AutoTokenizer.from_pretrained(tokenizer_path), tokenizer_path)
    info = {"stats": data.stats, "data_hash": data.data_hash, "prompt_version": data.prompt_version,
            "samples": data.eval[:num_samples], "node_id": ray.get_runtime_context().get_node_id()}
    return info, {"train": data.train, "eval": data.eval}


def _forget_previous_run(out_dir: str) -> None:
    """Drop an earlier run's manifest before its exports are replaced (see slim_ray.lineage)."""
    from slim_ray.lineage import MANIFEST

    storage.delete_file(storage.join(out_dir, MANIFEST))


def run_distill(cfg) -> dict[str, Any]:
    """Train, export and evaluate the student. Returns the stage summary (with a manifest part).

    Phases: the pairs (a Ray task), ``_train`` (Ray Train), ``_export`` (+ held-out samples),
    ``_write_eval``, ``_summary``."""
    import ray

    from slim_ray.assets import resolve_llm
    from slim_ray.runtime import init_ray

    d = cfg.distill
    t0 = time.time()
    base_path = resolve_llm(d.base_model, cfg.cache_dir)
    init_ray(cfg.ray)
    info_ref, data_ref = ray.remote(num_returns=2)(_build_data).remote(cfg, base_path, d.num_samples)
    info = ray.get(info_ref)
    stats = info["stats"]
    logger.warning("[distill] %d train / %d held-out pairs (%s)", stats["train"], stats["eval"],
                   {k: v for k, v in stats.items() if v})

    out_dir = storage.normalize(cfg.layout.distill)
    run = _train(cfg, base_path, info["data_hash"], data_ref, out_dir)
    m = dict(run["result"].metrics or {})
    _forget_previous_run(out_dir)
    exported, export_s, samples = _export(cfg, run["result"].checkpoint, base_path, info["samples"])
    _write_eval(out_dir, m, stats, samples)
    return _summary(cfg, base_path, info, run, m, exported, samples, {"export_s": export_s, "t0": t0})


def _train(cfg, base_path: str, data_hash: str, data_ref, out_dir: str) -> dict[str, Any]:
    """The Ray Train run (resumed when one of the same name has checkpoints). Returns its result,
    name, storage and wall seconds."""
    from transformers import AutoTokenizer

    from slim_ray.distill.train import build_trainer

    d = cfg.distill
    tok = AutoTokenizer.from_pretrained(base_path)
    run_name = run_name_for(cfg, data_hash)
    train_storage = storage.normalize(d.storage_path or storage.join(out_dir, "ray"))
    fs, fs_path = storage.resolve(train_storage)
    step_log = os.path.join(out_dir, "logs", f"{run_name}.jsonl") if storage.is_local(out_dir) else None
    trainer = build_trainer(
        d, seed=cfg.seed, data_ref=data_ref,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        storage_path=fs_path, storage_filesystem=fs, run_name=run_name, ray_cfg=cfg.ray,
        cache_dir=cfg.cache_dir, step_log=step_log,
    )
    t_train = time.time()
    result = trainer.fit()
    train_wall = time.time() - t_train
    if result.checkpoint is None:
        raise RuntimeError(f"distill run {run_name} finished without a checkpoint ({train_storage})")
    return {"result": result, "run_name": run_name, "storage": train_storage, "wall": train_wall}


def _export(cfg, checkpoint, base_path: str, held_out: list) -> tuple[dict[str, Any], float, list]:
    """Adapter and/or merged export of the final checkpoint, then held-out samples generated by
    the local copy of the merged model just written (no download)."""
    from slim_ray.distill.evaluate import generate_samples
    from slim_ray.distill.export import export_student

    d, lay = cfg.distill, cfg.layout
    with tempfile.TemporaryDirectory(prefix="slim_distill_export_") as work:
        t_export = time.time()
        with checkpoint.as_directory() as cdir:
            exported = export_student(
                cdir, base_path, d, lay.student_adapter if d.method == "lora" else "",
                lay.student_merged if (d.export_merged or d.method == "full") else "", work,
            )
        export_s = time.time() - t_export
        samples = []
        if held_out and exported.get("merged"):
            samples = generate_samples(exported["merged_local"], held_out, d.sample_max_new_tokens,
                                       repetition_penalty=cfg.student.repetition_penalty)
    return exported, export_s, samples


def _write_eval(out_dir: str, m: dict[str, Any], stats: dict[str, Any], samples: list) -> None:
    """``eval.json`` (held-out loss and perplexity before/after) and ``samples.jsonl``."""
    from slim_ray.distill.evaluate import perplexity

    eval_doc = {
        "eval_loss_before": m.get("eval_loss_before"), "eval_loss_after": m.get("eval_loss_after"),
        "eval_ppl_before": perplexity(m.get("eval_loss_before")),
        "eval_ppl_after": perplexity(m.get("eval_loss_after")),
        "eval_pairs": stats["eval"], "eval_target_tokens": stats["eval_target_tokens"],
        "samples": samples,
    }
    storage.write_json(storage.join(out_dir, "eval.json"), eval_doc)
    storage.write_text(storage.join(out_dir, "samples.jsonl"), "".join(json.dumps(x) + "\n" for x in samples))


def _summary(cfg, base_path: str, info: dict[str, Any], run: dict[str, Any], m: dict[str, Any],
             exported: dict[str, Any], samples: list, times: dict[str, float]) -> dict[str, Any]:
    """The stage summary, with the manifest part (hashes of the base model and the exports)."""
    from slim_ray.assets import hash_folder, model_id
    from slim_ray.distill.evaluate import perplexity

    d = cfg.distill
    manifest = {
        "base_model": model_id(d.base_model), "base_model_path": base_path,
        "base_model_hash": hash_folder(base_path), "adapter_hash": exported.get("adapter_hash"),
        "merged_hash": exported.get("merged_hash"), "data_hash": info["data_hash"],
        "prompt_version": info["prompt_version"], "eval_loss": m.get("eval_loss_after"),
    }
    return {
        "run_name": run["run_name"], "storage_path": run["storage"], "checkpoint": run["result"].checkpoint.path,
        "strategy": d.strategy, "zero_stage": d.zero_stage if d.strategy == "deepspeed" else None,
        "method": d.method, "num_workers": d.num_workers, "data": info["stats"],
        "steps": m.get("steps"), "train_loss": m.get("train_loss"),
        "eval_loss_before": m.get("eval_loss_before"), "eval_loss_after": m.get("eval_loss_after"),
        "eval_ppl_before": perplexity(m.get("eval_loss_before")),
        "eval_ppl_after": perplexity(m.get("eval_loss_after")),
        "trainable_params": m.get("trainable_params"), "tokens_per_s": m.get("tokens_per_s"),
        "peak_rss_mb_max": m.get("peak_rss_mb_max"), "bf16": m.get("bf16"),
        "train_wall_s": round(run["wall"], 1), "export_s": round(times["export_s"], 1),
        "total_s": round(time.time() - times["t0"], 1), "adapter": exported.get("adapter"),
        "merged": exported.get("merged"), "manifest": manifest, "num_samples": len(samples),
        "node_ids": sorted(set([info["node_id"]] + list(m.get("node_ids") or []))),
    }
