"""The Ray Train loop: LoRA (or full) fine-tuning of the student, resumable at any checkpoint.

``train_loop_per_worker`` runs in every Ray Train worker. It is written against
``slim_ray.distill.strategy.Strategy`` only, so the same loop runs DeepSpeed ZeRO-0..3 or DDP, and
it validates its ``DistillConfig`` again from the dict Ray Train ships (typed from end to end).
Its phases: ``_setup`` (data, model, strategy), ``_restore_or_seed``, ``_train_steps``,
``_final_metrics``, then the final checkpoint.

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
from dataclasses import dataclass
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


def build_model(base_path: str, d):
    """fp32 base model (+ LoRA) for ``DistillConfig`` ``d`` (or its dict). Raises when LoRA's
    trainable count is not the expected one."""
    import torch
    from transformers import AutoModelForCausalLM

    from slim_ray.distill.config import DistillConfig

    d = DistillConfig.model_validate(d)  # a DistillConfig passes through unchanged
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.config.use_cache = False
    if d.method == "full":
        # a ZeRO-3 partitioned parameter reports numel() 0; ds_numel is its full size
        return model, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    from peft import get_peft_model

    expected = expected_lora_params(model, d.lora_target_modules, d.lora_r)
    if expected == 0:
        raise ValueError(
            f"distill.lora_target_modules={d.lora_target_modules} match no Linear layer of {base_path}"
        )
    model = get_peft_model(model, d.lora_config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != expected:
        raise RuntimeError(f"LoRA made {trainable} trainable parameters, expected {expected}")
    return model, trainable


def total_steps(n_train: int, d, world_size: int) -> int:
    if d.max_steps:
        return int(d.max_steps)
    global_batch = d.batch_size * d.grad_accum * world_size
    return max(1, math.ceil(d.epochs * n_train / global_batch))


def make_scheduler(optimizer, d, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[d.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(d.warmup_ratio * steps),
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


@dataclass
class _Worker:
    """What one worker holds for the whole run (built by ``_setup``)."""

    d: Any  # DistillConfig
    config: dict[str, Any]
    strategy: Any  # slim_ray.distill.strategy.Strategy
    train: list
    evals: list
    seed: int
    steps: int
    pad_id: int
    n_trainable: int
    start: int = 0
    eval_before: Optional[float] = None
    restored_from: Optional[str] = None

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def ws(self) -> int:
        return self.strategy.world_size


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: distill (DistillConfig dict, validated again here), seed,
    base_model, cache_dir, data (ObjectRef or dict with train/eval Example lists), pad_id, use_gpu,
    bf16, step_log, save_final."""
    import torch

    from slim_ray.distill.config import DistillConfig

    t_setup = time.time()
    d = DistillConfig.model_validate(config["distill"])
    use_gpu = bool(config.get("use_gpu"))
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(d.torch_threads or d.cpus_per_worker)
    mem = PeakMemory().start()

    w = _setup(config, d, use_gpu)
    _restore_or_seed(w)
    w.strategy.train(True)
    setup_seconds = time.time() - t_setup
    if w.rank == 0:
        print(f"[distill] worker ready in {setup_seconds:.1f}s (model, {d.strategy} setup, "
              f"restore/eval)", flush=True)
    loop = _train_steps(w)
    metrics = _final_metrics(w, loop, mem, setup_seconds)
    if config.get("save_final", True):
        _checkpoint(w, w.steps, metrics)
    else:
        _report_metrics_only(w, metrics)


def _setup(config: dict[str, Any], d, use_gpu: bool) -> _Worker:
    """Data, model (seeded: identical LoRA init on every rank), strategy, optimizer, scheduler."""
    import ray
    import torch

    from slim_ray.assets import resolve_llm
    from slim_ray.distill.strategy import make_strategy, seed_everything

    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    base_path = resolve_llm(config["base_model"], config.get("cache_dir"))
    seed = int(config["seed"])
    seed_everything(seed)  # identical LoRA init on every rank
    strategy = make_strategy(d, bf16=bool(config["bf16"]), use_gpu=use_gpu)
    with strategy.loading(partitioned=d.method == "full"):
        model, n_trainable = build_model(base_path, d)
    steps = total_steps(len(data["train"]), d, strategy.world_size)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=d.lr, weight_decay=d.weight_decay
    )
    strategy.setup(model, optimizer, make_scheduler(optimizer, d, steps))
    return _Worker(d, config, strategy, data["train"], data["eval"], seed, steps, config["pad_id"],
                   n_trainable)


def _restore_or_seed(w: _Worker) -> None:
    """Continue from Ray Train's latest checkpoint, or seed a fresh run; then the loss before."""
    import ray.train

    from slim_ray.distill.evaluate import heldout_loss
    from slim_ray.distill.strategy import seed_everything

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            state = w.strategy.load(cdir)
        w.start, w.eval_before, w.restored_from = int(state["step"]), state.get("eval_before"), ckpt.path
        if w.rank == 0:
            print(f"[distill] restored step {w.start}/{w.steps} from {ckpt.path}", flush=True)
    else:
        seed_everything(w.seed + 1000 * w.rank)  # dropout differs per rank, reproducibly
    if w.eval_before is None:
        w.eval_before = heldout_loss(w.strategy, w.evals, w.d.eval_batch_size, w.pad_id)


def _checkpoint(w: _Worker, step: int, metrics: dict[str, Any]) -> None:
    """Collective: every rank saves its part, Ray Train merges the folders in storage."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix=f"slim_distill_r{w.rank}_")
    try:
        w.strategy.save(tmp, {"step": step, "eval_before": w.eval_before}, w.d.method == "lora")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_steps(w: _Worker) -> dict[str, Any]:
    """Optimizer steps ``w.start``..``w.steps``; returns the timings, tokens and last loss."""
    from slim_ray.distill.dataset import collate, step_indices

    d, strategy, rank, ws = w.d, w.strategy, w.rank, w.ws
    global_batch = d.batch_size * d.grad_accum * ws
    per_rank = d.batch_size * d.grad_accum
    t0, tokens, last_loss = time.time(), 0, float("nan")
    t1, tokens1 = None, 0  # after the first step: steady-state throughput
    for step in range(w.start, w.steps):
        idx = step_indices(len(w.train), step, global_batch, w.seed)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        loss_sum, n_tok = 0.0, 0
        for m in range(d.grad_accum):
            batch = collate([w.train[i] for i in mine[m * d.batch_size:(m + 1) * d.batch_size]], w.pad_id)
            loss = strategy.loss(batch)
            strategy.backward(loss)
            strategy.step()
            loss_sum += float(loss.detach())
            n_tok += int(batch["attention_mask"].sum())
        loss_avg, tok_all = strategy.all_reduce([loss_sum / d.grad_accum, n_tok], "sum")
        last_loss = loss_avg / ws
        tokens += int(tok_all)
        done = step + 1
        if t1 is None:
            t1, tokens1 = time.time(), tokens
        if rank == 0:
            _log_step(w, done, last_loss, idx, tokens / max(time.time() - t0, 1e-9))
        if done % d.checkpoint_every == 0 and done < w.steps:
            _checkpoint(w, done, {"step": done, "train_loss": last_loss})
    return {"t0": t0, "t1": t1, "tokens": tokens, "tokens1": tokens1, "last_loss": last_loss,
            "train_seconds": time.time() - t0}


def _log_step(w: _Worker, done: int, loss: float, samples: list[int], tok_per_s: float) -> None:
    """Rank 0: the step log line (the fault test reads it) and a console line now and then."""
    _append_jsonl(w.config.get("step_log"), {
        "step": done, "loss": loss, "lr": w.strategy.lr(), "pid": os.getpid(),
        "samples": samples, "time": time.time(),
    })
    if done == w.start + 1 or done % max(1, w.steps // 20) == 0 or done == w.steps:
        print(f"[distill] step {done}/{w.steps} loss {loss:.4f} lr {w.strategy.lr():.2e} "
              f"{tok_per_s:.0f} tok/s", flush=True)


def _final_metrics(w: _Worker, loop: dict[str, Any], mem: PeakMemory, setup_seconds: float) -> dict[str, Any]:
    """Collective: the held-out loss after training, where the workers ran, their memory."""
    import ray

    from slim_ray.distill.evaluate import heldout_loss

    strategy, ws, steps = w.strategy, w.ws, w.steps
    eval_after = heldout_loss(strategy, w.evals, w.d.eval_batch_size, w.pad_id)
    node_ids = sorted(set(strategy.all_gather_object(ray.get_runtime_context().get_node_id())))
    mem.stop()
    tokens, train_seconds, t0, t1 = loop["tokens"], loop["train_seconds"], loop["t0"], loop["t1"]
    return {
        "step": steps, "steps": steps, "start_step": w.start, "train_loss": loop["last_loss"],
        "eval_loss_before": w.eval_before, "eval_loss_after": eval_after,
        "eval_ppl_before": math.exp(w.eval_before) if w.eval_before is not None else None,
        "eval_ppl_after": math.exp(eval_after) if eval_after is not None else None,
        "trainable_params": w.n_trainable, "train_seconds": train_seconds,
        "train_tokens": tokens, "setup_seconds": setup_seconds,
        "tokens_per_s": tokens / max(train_seconds, 1e-9),
        "tokens_per_s_steady": ((tokens - loop["tokens1"]) / max(t0 + train_seconds - t1, 1e-9)
                                if t1 is not None and steps - w.start > 1 else None),
        "peak_rss_mb_mean": strategy.all_reduce([mem.peak_mb], "sum")[0] / ws,
        "peak_rss_mb_max": strategy.all_reduce([mem.peak_mb], "max")[0], "world_size": ws,
        "rss_base_mb": strategy.all_reduce([mem.base / 2**20], "sum")[0] / ws,
        "restored_from": w.restored_from, "bf16": bool(w.config["bf16"]), "node_ids": node_ids,
    }


def _report_metrics_only(w: _Worker, metrics: dict[str, Any]) -> None:
    """Benchmarks: no weights, only a metrics file (Ray Train keeps metrics with checkpoints)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="slim_distill_metrics_")
    try:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if w.rank == 0 else None)
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
