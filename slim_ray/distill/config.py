"""Config of the distillation stage (``distill:`` section of a pipeline YAML)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from slim_ray.configbase import StageConfig


class DistillConfig(StageConfig):
    """Fine-tune the student on (student prompt p' -> teacher rationale) pairs with Ray Train."""

    # ---- model
    base_model: str = Field(
        "smollm2-135m-instruct", description="Student base model: packaged name or local HF folder."
    )
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora': train PEFT LoRA adapters only (the paper); 'full': every weight."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha (effective scale alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the Linear modules that get LoRA adapters.",
    )

    # ---- data
    max_length: int = Field(
        384, ge=16, description="Max tokens of prompt + rationale; longer samples are cut "
        "(rationale tail first) and counted as truncated."
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of users held out (seeded) for eval loss and samples."
    )
    min_eval_users: int = Field(2, ge=0, description="Hold out at least this many users.")
    max_samples: Optional[int] = Field(
        None, ge=1, description="Use at most this many usable teacher rationales (seeded); None = all."
    )
    drop_missing_steps: bool = Field(
        False, description="Skip rationales whose step1/step2/step3 are not all filled."
    )
    drop_seen_items: bool = Field(
        False, description="Skip rationales whose step 3 names an item title from the user's history."
    )

    # ---- distributed training
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each).")
    use_gpu: Optional[bool] = Field(
        None, description="One GPU per worker; None = when the Ray cluster has GPUs."
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker.")
    strategy: Literal["deepspeed", "ddp"] = Field(
        "deepspeed", description="'deepspeed' (ZeRO, zero_stage) or plain torch DDP."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory.")
    bf16: Optional[bool] = Field(
        None, description="bf16 autocast for forward/backward (fp32 master weights). None = on "
        "when the hardware has bf16 (a GPU with bf16 or a CPU with AVX512-BF16/AMX), else off."
    )
    batch_size: int = Field(4, ge=1, description="Micro-batch size per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: float = Field(2.0, gt=0, description="Passes over the training split.")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR decay after warmup."
    )
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip (0 = off).")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch threads per worker; None = cpus_per_worker."
    )

    # ---- checkpoints and faults
    checkpoint_every: int = Field(25, ge=1, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
    max_failures: int = Field(
        1, ge=-1, description="Worker-group restarts from the latest checkpoint (-1 = unlimited)."
    )
    storage_path: Optional[str] = Field(
        None, description="Ray Train storage (shared filesystem path or URI such as s3://...); "
        "None = <run_dir>/distill/ray."
    )
    run_name: Optional[str] = Field(
        None, description="Ray Train run name; a rerun with the same name resumes. None = "
        "derived from the config and data fingerprint."
    )

    # ---- evaluation and export
    eval_batch_size: int = Field(8, ge=1, description="Batch size for held-out loss.")
    num_samples: int = Field(2, ge=0, description="Held-out users whose student rationale is "
                             "generated after training, beside the teacher's.")
    sample_max_new_tokens: int = Field(160, ge=1, description="Generation length of those samples.")
    export_merged: bool = Field(True, description="Also write the merged model (LoRA folded in).")

    def lora_config(self):
        """The PEFT ``LoraConfig`` of this run: the one place it is built (training and export)."""
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM", r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
        )

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        if self.strategy == "ddp" and (self.offload_optimizer or self.offload_params):
            raise ValueError("offload_* needs strategy: deepspeed")
        return self
