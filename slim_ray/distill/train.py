"""The Ray Train loop: LoRA (or full) fine-tuning of the student, resumable at any checkpoint.

``train_loop_per_worker`` runs in every Ray Train worker. It is written against
``slim_ray.distill.strategy.Strategy`` only, so the same loop runs DeepSpeed ZeRO-0..3 or DDP.

What a checkpoint holds (restored by ``FailureConfig(max_failures)`` after a worker dies):
model weights (trainable ones for LoRA), optimizer and LR scheduler state (DeepSpeed/torch),
the step counter -- the data position, because the batches of step k are a pure function of
(seed, k), see ``dataset.step_indices`` -- and each rank's RNG state. A restored run continues at
the step after the checkpoint; nothing before it is trained twice.

``build_trainer`` wires it into a ``TorchTrainer`` (storage may be a shared path or a URI).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Optional

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


class PeakMemory:
    """Samples this process's RSS in a thread; ``peak_mb`` is the max seen since ``start``."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self.base = self.peak
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def start(self) -> "PeakMemory":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def expected_lora_params(model, targets: list[str], r: int) -> int:
    """r * (in + out) for every Linear whose name ends in a target -- what LoRA must add."""
    import torch

    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            total += r * (mod.in_features + mod.out_features)
    return total


def build_model(base_path: str, d: dict[str, Any]):
    """fp32 base model (+ LoRA). Raises when LoRA's trainable count is not the expected one."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.config.use_cache = False
    if d["method"] == "full":
        return model, sum(p.numel() for p in model.parameters())
    from peft import get_peft_model

    from slim_ray.distill.config import DistillConfig

    expected = expected_lora_params(model, d["lora_target_modules"], d["lora_r"])
    if expected == 0:
        raise ValueError(
            f"distill.lora_target_modules={d['lora_target_modules']} match no Linear layer of {base_path}"
        )
    model = get_peft_model(model, DistillConfig.model_validate(d).lora_config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != expected:
        raise RuntimeError(f"LoRA made {trainable} trainable parameters, expected {expected}")
    return model, trainable


def total_steps(n_train: int, d: dict[str, Any], world_size: int) -> int:
    if d.get("max_steps"):
        return int(d["max_steps"])
    global_batch = d["batch_size"] * d["grad_accum"] * world_size
    return max(1, math.ceil(d["epochs"] * n_train / global_batch))


def make_scheduler(optimizer, d: dict[str, Any], steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[d["schedule"]]
    return get_scheduler(name, optimizer, num_warmup_steps=int(d["warmup_ratio"] * steps),
                         num_training_steps=steps)


def _append_jsonl(path: Optional[str], record: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: distill (DistillConfig dict), seed, base_model,
    cache_dir, data (ObjectRef or dict with train/eval Example lists), use_gpu, step_log."""
    import ray
    import ray.train
    import torch

    from slim_ray.assets import resolve_llm
    from slim_ray.distill.dataset import collate, step_indices
    from slim_ray.distill.evaluate import heldout_loss
    from slim_ray.distill.strategy import Strategy, seed_everything

    t_setup = time.time()
    d = config["distill"]
    use_gpu = bool(config.get("use_gpu"))
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(d.get("torch_threads") or d["cpus_per_worker"])
    mem = PeakMemory().start()

    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    train, evals = data["train"], data["eval"]

    base_path = resolve_llm(config["base_model"], config.get("cache_dir"))
    seed = int(config["seed"])
    seed_everything(seed)  # identical LoRA init on every rank
    model, n_trainable = build_model(base_path, d)

    strategy = Strategy(
        d["strategy"], zero_stage=d["zero_stage"], offload_optimizer=d["offload_optimizer"],
        offload_params=d["offload_params"], bf16=bool(config["bf16"]), batch_size=d["batch_size"],
        grad_accum=d["grad_accum"], grad_clip=d["grad_clip"], use_gpu=use_gpu,
    )
    rank, ws = strategy.rank, strategy.world_size
    steps = total_steps(len(train), d, ws)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=d["lr"], weight_decay=d["weight_decay"]
    )
    strategy.setup(model, optimizer, make_scheduler(optimizer, d, steps))
    pad_id = config["pad_id"]
    trainable_only = d["method"] == "lora"

    start, eval_before, restored_from = 0, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            state = strategy.load(cdir)
        start, eval_before, restored_from = int(state["step"]), state.get("eval_before"), ckpt.path
        if rank == 0:
            print(f"[distill] restored step {start}/{steps} from {ckpt.path}", flush=True)
    else:
        seed_everything(seed + 1000 * rank)  # dropout differs per rank, reproducibly
    if eval_before is None:
        eval_before = heldout_loss(strategy, evals, d["eval_batch_size"], pad_id)

    def checkpoint(step: int, metrics: dict[str, Any]) -> None:
        tmp = tempfile.mkdtemp(prefix=f"slim_distill_r{rank}_")
        try:
            strategy.save(tmp, {"step": step, "eval_before": eval_before}, trainable_only)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    global_batch = d["batch_size"] * d["grad_accum"] * ws
    per_rank = d["batch_size"] * d["grad_accum"]
    strategy.train(True)
    setup_seconds = time.time() - t_setup
    if rank == 0:
        print(f"[distill] worker ready in {setup_seconds:.1f}s (model, {d['strategy']} setup, "
              f"restore/eval)", flush=True)
    t0, tokens, last_loss = time.time(), 0, float("nan")
    t1, tokens1 = None, 0  # after the first step: steady-state throughput
    for step in range(start, steps):
        idx = step_indices(len(train), step, global_batch, seed)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        loss_sum, n_tok = 0.0, 0
        for m in range(d["grad_accum"]):
            batch = collate([train[i] for i in mine[m * d["batch_size"]:(m + 1) * d["batch_size"]]], pad_id)
            loss = strategy.loss(batch)
            strategy.backward(loss)
            strategy.step()
            loss_sum += float(loss.detach())
            n_tok += int(batch["attention_mask"].sum())
        loss_avg, tok_all = strategy.all_reduce_sum([loss_sum / d["grad_accum"], n_tok])
        last_loss = loss_avg / ws
        tokens += int(tok_all)
        done = step + 1
        if t1 is None:
            t1, tokens1 = time.time(), tokens
        if rank == 0:
            elapsed = time.time() - t0
            _append_jsonl(config.get("step_log"), {
                "step": done, "loss": last_loss, "lr": strategy.lr(), "pid": os.getpid(),
                "samples": idx, "time": time.time(),
            })
            if done == start + 1 or done % max(1, steps // 20) == 0 or done == steps:
                print(f"[distill] step {done}/{steps} loss {last_loss:.4f} lr {strategy.lr():.2e} "
                      f"{tokens / max(elapsed, 1e-9):.0f} tok/s", flush=True)
        if done % d["checkpoint_every"] == 0 and done < steps:
            checkpoint(done, {"step": done, "train_loss": last_loss})

    train_seconds = time.time() - t0
    eval_after = heldout_loss(strategy, evals, d["eval_batch_size"], pad_id)
    node_ids = sorted(set(strategy.all_gather_object(ray.get_runtime_context().get_node_id())))
    mem.stop()
    peak = strategy.all_reduce_sum([mem.peak_mb])[0] / ws
    peak_max = max(strategy.all_reduce_sum(
        [mem.peak_mb if r == rank else 0.0 for r in range(ws)]))
    metrics = {
        "step": steps, "steps": steps, "start_step": start, "train_loss": last_loss,
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "eval_ppl_before": math.exp(eval_before) if eval_before is not None else None,
        "eval_ppl_after": math.exp(eval_after) if eval_after is not None else None,
        "trainable_params": n_trainable, "train_seconds": train_seconds,
        "train_tokens": tokens, "setup_seconds": setup_seconds, "tokens_per_s": tokens / max(train_seconds, 1e-9),
        "tokens_per_s_steady": ((tokens - tokens1) / max(t0 + train_seconds - t1, 1e-9)
                                if t1 is not None and steps - start > 1 else None),
        "peak_rss_mb_mean": peak, "peak_rss_mb_max": peak_max, "world_size": ws,
        "rss_base_mb": strategy.all_reduce_sum([mem.base / 2**20])[0] / ws,
        "restored_from": restored_from, "bf16": bool(config["bf16"]), "node_ids": node_ids,
    }
    if config.get("save_final", True):
        checkpoint(steps, metrics)
    else:  # benchmarks: no weights, only a metrics file (Ray Train keeps metrics with checkpoints)
        tmp = tempfile.mkdtemp(prefix="slim_distill_metrics_")
        try:
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the trainer


def build_trainer(
    d, *, seed: int, data_ref, pad_id: int, storage_path: str, run_name: str,
    ray_cfg=None, cache_dir: Optional[str] = None, step_log: Optional[str] = None,
    use_gpu: Optional[bool] = None, save_final: bool = True, storage_filesystem=None,
):
    """A TorchTrainer for DistillConfig ``d`` (not started). ``storage_path`` + ``storage_filesystem``
    (``slim_ray.storage.resolve`` of a run URI) is where Ray Train keeps checkpoints."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slim_ray.distill.strategy import bf16_supported
    from slim_ray.runtime import train_backend_config

    if use_gpu is None:
        use_gpu = d.use_gpu if d.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    bf16 = d.bf16 if d.bf16 is not None else bf16_supported(use_gpu)
    resources = {"CPU": d.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "distill": d.model_dump(mode="json"), "seed": seed, "base_model": d.base_model,
            "cache_dir": cache_dir, "data": data_ref, "pad_id": pad_id, "use_gpu": use_gpu,
            "bf16": bf16, "step_log": step_log, "save_final": save_final,
        },
        scaling_config=ScalingConfig(
            num_workers=d.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=ray_cfg.train_placement if ray_cfg is not None else "PACK",
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.keep_checkpoints),
        ),
        torch_config=train_backend_config(ray_cfg),
    )
