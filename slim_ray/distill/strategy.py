"""The training strategy: owns the distributed backend so model code never touches it.

Two backends behind one small interface, the abstract ``Strategy`` (``setup``, ``loss``,
``backward``, ``step``, ``save``/``load``, ``all_reduce(values, op)``, ``all_gather_object``,
``barrier``); ``make_strategy`` picks the class ``DistillConfig.strategy`` names:

- ``DeepSpeedStrategy`` (``deepspeed``): ``deepspeed.initialize`` with ZeRO stage 0-3 (+ optional
  CPU offload), reusing the process group Ray Train already made (``dist_init_required=False``).
  The optimizer is a plain ``torch.optim.AdamW`` passed in (``zero_allow_untested_optimizer``): a
  DeepSpeed-config optimizer would JIT-compile a C++ op for minutes on CPU. fp16/bf16 are off in
  the DeepSpeed config: mixed precision is bf16 autocast around the forward pass, with fp32
  master weights, which works the same on CPU and GPU.
- ``DDPStrategy`` (``ddp``): torch ``DistributedDataParallel`` (the baseline DeepSpeed is
  measured against).

Checkpoints are folders: every rank writes its own files into its own local folder (DeepSpeed's
per-rank ZeRO shards, one RNG file per rank); Ray Train merges them in storage. Our own files
(``ddp_state.pt``, ``rng_rank*.pt``) hold tensors and plain Python values only and are loaded with
``torch.load(weights_only=True)``. DeepSpeed's ``load_checkpoint`` and ``zero_to_fp32`` unpickle
their files with ``weights_only=False``: checkpoint storage must be trusted (see docs/distill.md).
"""

from __future__ import annotations

import os
import random
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any

import numpy as np

DS_TAG = "ckpt"


def bf16_supported(use_gpu: bool) -> bool:
    """bf16 autocast pays off: a GPU with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def deepspeed_config(
    *, zero_stage: int, batch_size: int, grad_accum: int, world_size: int, grad_clip: float,
    offload_optimizer: bool = False, offload_params: bool = False,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if zero_stage == 3:
        # Gather a parameter on use rather than keep a prefetch window, and release it after: with
        # DeepSpeed's defaults (1e9 live parameters) a model under 1B parameters stays gathered
        # whole on every worker after its first forward, which is what ZeRO-3 is chosen to avoid.
        # The optimizer steps one sub-group of 5e7 elements at a time (default 1e9: the whole
        # partition at once), so Adam's temporaries are 200 MB, not the partition's size: for a full
        # fine-tune of the 0.63B model on 2 CPU ranks that took each rank's peak in its first step
        # from 10.7 to 8.2 GB.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0,
                    stage3_max_live_parameters=int(1e8), stage3_max_reuse_distance=int(1e8),
                    reduce_bucket_size=int(5e7), sub_group_size=int(5e7))
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Strategy(ABC):
    """One training process's view of the distributed backend (the interface the loop uses).

    The shared part lives here: rank, world size and device, bf16 autocast, the loss of a batch,
    collectives (``all_reduce``, ``all_gather_object``, ``barrier``) and each rank's RNG file in a
    checkpoint. A backend subclass wraps the model and owns backward, step and its own
    checkpoint files. Build one with ``make_strategy``.
    """

    kind: str = ""

    def __init__(
        self, *, bf16: bool = False, batch_size: int = 1, grad_accum: int = 1, grad_clip: float = 1.0,
        use_gpu: bool = False,
    ):
        import torch
        import torch.distributed as dist

        self.bf16 = bf16
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if use_gpu and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.model = None  # the wrapped model (DeepSpeed engine or DDP)
        self.optimizer = None
        self.scheduler = None
        self._micro = 0

    # ------------------------------------------------------------------ backend

    @abstractmethod
    def setup(self, model, optimizer, scheduler):
        """Wrap model/optimizer/scheduler for the backend. Returns the wrapped model."""

    @abstractmethod
    def backward(self, loss) -> None:
        """Backward of one micro-batch's loss (scaled by 1/grad_accum)."""

    @abstractmethod
    def step(self) -> bool:
        """After each micro-batch. Returns True when an optimizer step happened."""

    @abstractmethod
    def _save_state(self, directory: str, client_state: dict[str, Any], trainable_only: bool) -> None:
        """Collective: the backend's own checkpoint files."""

    @abstractmethod
    def _load_state(self, directory: str) -> dict[str, Any]:
        """Restore model, optimizer and scheduler; returns the client state."""

    def loading(self, partitioned: bool):
        """A context to build the model in (``DeepSpeedStrategy`` partitions it under ZeRO-3)."""
        return nullcontext()

    # ------------------------------------------------------------------ compute

    @property
    def module(self):
        """The unwrapped model (e.g. a PeftModel)."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def autocast(self):
        import torch

        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def loss(self, batch) -> "Any":
        """Mean next-token loss over the unmasked label positions of ``batch``."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            out = self.model(**batch)
        return out.loss

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` reduced element-wise over the ranks (float64): ``op`` is sum, max or min."""
        import torch
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"all_reduce: unknown op {op!r} (expected one of {', '.join(ops)})")
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t, op=ops[op])
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small picklable values, e.g. node ids), in rank order."""
        import torch.distributed as dist

        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str, client_state: dict[str, Any], trainable_only: bool) -> None:
        """Collective: every rank writes its part of the checkpoint into ``directory``."""
        import torch

        os.makedirs(directory, exist_ok=True)
        torch.save(_rng_state(), os.path.join(directory, f"rng_rank{self.rank}.pt"))
        self._save_state(directory, client_state, trainable_only)

    def load(self, directory: str) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and this rank's RNG; returns the client state."""
        import torch

        client_state = self._load_state(directory)
        rng = os.path.join(directory, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng):
            _set_rng_state(torch.load(rng, weights_only=True))
        return dict(client_state)


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 0-3 (+ optional CPU offload) over the process group Ray Train made."""

    kind = "deepspeed"

    def __init__(self, *, zero_stage: int = 2, offload_optimizer: bool = False, offload_params: bool = False,
                 **common):
        super().__init__(**common)
        self.zero_stage = zero_stage
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params

    def _config(self) -> dict[str, Any]:
        return deepspeed_config(
            zero_stage=self.zero_stage, batch_size=self.batch_size, grad_accum=self.grad_accum,
            world_size=self.world_size, grad_clip=self.grad_clip,
            offload_optimizer=self.offload_optimizer, offload_params=self.offload_params,
        )

    def loading(self, partitioned: bool):
        """Under ZeRO-3 with ``partitioned``: a Hugging Face model built inside this context loads
        straight into partitions (``zero.Init`` through ``HfDeepSpeedConfig``), so no worker ever
        holds the whole model. That is what lets a full fine-tune too big for one worker start."""
        if not (partitioned and self.zero_stage == 3):
            return nullcontext()
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo" if self.device.type == "cpu" else "nccl",
                                   auto_mpi_discovery=False)  # wraps Ray Train's process group
        # transformers reads it through a weak reference: the strategy keeps it for the whole run
        self._hf_deepspeed_config = HfDeepSpeedConfig(self._config())
        return nullcontext()

    def setup(self, model, optimizer, scheduler):
        import deepspeed

        engine, opt, _, sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._config(),
            dist_init_required=False,
        )
        self.model, self.optimizer, self.scheduler = engine, opt, sched
        return self.model

    def backward(self, loss) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum itself

    def step(self) -> bool:
        self._micro += 1
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        return boundary

    def _save_state(self, directory: str, client_state: dict[str, Any], trainable_only: bool) -> None:
        self.model.save_checkpoint(
            directory, tag=DS_TAG, client_state=client_state, exclude_frozen_parameters=trainable_only,
        )

    def _load_state(self, directory: str) -> dict[str, Any]:
        _, client_state = self.model.load_checkpoint(
            directory, tag=DS_TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if client_state is None:
            raise RuntimeError(f"{directory}: not a DeepSpeed checkpoint (tag {DS_TAG!r})")
        return client_state


class DDPStrategy(Strategy):
    """torch ``DistributedDataParallel``: the baseline DeepSpeed is measured against."""

    kind = "ddp"

    def setup(self, model, optimizer, scheduler):
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        if self.distributed:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return self.model

    def backward(self, loss) -> None:
        ctx = nullcontext()
        boundary = (self._micro + 1) % self.grad_accum == 0
        if self.distributed and not boundary:
            ctx = self.model.no_sync()  # gradients are summed over ranks once, at the boundary
        with ctx:
            (loss / self.grad_accum).backward()

    def step(self) -> bool:
        import torch

        self._micro += 1
        if self._micro % self.grad_accum:
            return False
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.grad_clip
            )
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _save_state(self, directory: str, client_state: dict[str, Any], trainable_only: bool) -> None:
        import torch

        if self.rank == 0:
            module = self.module
            state = module.state_dict()
            if trainable_only:
                names = {n for n, p in module.named_parameters() if p.requires_grad}
                state = {k: v for k, v in state.items() if k in names}
            torch.save(
                {"model": state, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "client_state": client_state, "micro": self._micro},
                os.path.join(directory, "ddp_state.pt"),
            )
        self.barrier()

    def _load_state(self, directory: str) -> dict[str, Any]:
        import torch

        state = torch.load(os.path.join(directory, "ddp_state.pt"), map_location=self.device,
                           weights_only=True)
        missing = set(state["model"]) - set(self.module.state_dict())
        if missing:
            raise RuntimeError(f"{directory}: checkpoint has unknown weights {sorted(missing)[:3]}")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]
        return state["client_state"]


def make_strategy(d, *, bf16: bool, use_gpu: bool) -> Strategy:
    """The strategy ``DistillConfig`` ``d`` names (``d.strategy``), configured from it."""
    common = dict(bf16=bf16, batch_size=d.batch_size, grad_accum=d.grad_accum, grad_clip=d.grad_clip,
                  use_gpu=use_gpu)
    if d.strategy == "deepspeed":
        return DeepSpeedStrategy(zero_stage=d.zero_stage, offload_optimizer=d.offload_optimizer,
                                 offload_params=d.offload_params, **common)
    if d.strategy == "ddp":
        return DDPStrategy(**common)
    raise ValueError(f"distill.strategy={d.strategy!r}: expected deepspeed or ddp")


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    import torch

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def consolidate_deepspeed(directory: str, tag: str = DS_TAG) -> dict[str, Any]:
    """fp32 state dict of the trained weights from a (merged) ZeRO checkpoint folder. DeepSpeed
    unpickles the checkpoint files here: the checkpoint storage must be trusted."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag))


def consolidate(directory: str) -> dict[str, Any]:
    """fp32 trained weights from a checkpoint folder of either backend."""
    import torch

    ddp = os.path.join(directory, "ddp_state.pt")
    if os.path.exists(ddp):
        state = torch.load(ddp, map_location="cpu", weights_only=True)["model"]
        return {k: v.float() for k, v in state.items()}
    return consolidate_deepspeed(directory)
