"""Export the trained student from a Ray Train checkpoint.

- ``adapter/``: the PEFT LoRA adapter (``adapter_config.json`` names the base model folder) --
  what vLLM's LoRA path loads on top of the base model;
- ``merged/``: the base model with the LoRA update folded in, safetensors + tokenizer, in the base
  model's dtype -- loadable with ``AutoModelForCausalLM.from_pretrained`` and by vLLM as a plain
  model (what the ``hf`` generation engine loads).

The weights come from the checkpoint through DeepSpeed's ``zero_to_fp32`` consolidation (any ZeRO
stage, any number of ranks) or the DDP state file. Each folder is written next to its final place
and moved in at the end, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from slim_ray.assets import hash_folder


def _replace_dir(staging: str, final: str) -> None:
    if os.path.exists(final):
        shutil.rmtree(final)
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    os.replace(staging, final)


def lora_config(d):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout,
        target_modules=list(d.lora_target_modules),
    )


def export_student(
    checkpoint_dir: str, base_path: str, d, adapter_dir: str, merged_dir: str,
) -> dict[str, Any]:
    """Write adapter (LoRA only) and merged model; return their paths and content hashes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slim_ray.distill.strategy import consolidate

    state = consolidate(checkpoint_dir)
    from transformers import AutoConfig

    base_dtype = getattr(AutoConfig.from_pretrained(base_path), "dtype", None) or torch.float32
    base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    out: dict[str, Any] = {}
    if d.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(base, lora_config(d))
        own = model.state_dict()
        lora_keys = [k for k in own if "lora_" in k]
        missing = [k for k in lora_keys if k not in state]
        if missing:
            raise RuntimeError(f"{checkpoint_dir}: checkpoint lacks LoRA weights, e.g. {missing[:2]}")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        staging = adapter_dir.rstrip("/") + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        _replace_dir(staging, adapter_dir)
        out.update(adapter=adapter_dir, adapter_hash=hash_folder(adapter_dir),
                   lora_tensors=len(lora_keys))
        merged = model.merge_and_unload()
    else:
        own = base.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise RuntimeError(f"{checkpoint_dir}: weights the base model lacks, e.g. {unknown[:2]}")
        base.load_state_dict(state, strict=False)
        merged = base
    if merged_dir:
        merged = merged.to(base_dtype)
        merged.config.use_cache = True
        staging = merged_dir.rstrip("/") + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        merged.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(staging)
        _replace_dir(staging, merged_dir)
        out.update(merged=merged_dir, merged_hash=hash_folder(merged_dir), merged_dtype=str(base_dtype))
    return out
