"""Export the trained student from a Ray Train checkpoint.

- ``adapter/``: the PEFT LoRA adapter (``adapter_config.json`` names the base model folder) --
  what vLLM's LoRA path loads on top of the base model;
- ``merged/``: the base model with the LoRA update folded in, safetensors + tokenizer, in the base
  model's dtype -- loadable with ``AutoModelForCausalLM.from_pretrained`` and by vLLM as a plain
  model (what the ``hf`` generation engine loads).

The weights come from the checkpoint through DeepSpeed's ``zero_to_fp32`` consolidation (any ZeRO
stage, any number of ranks) or the DDP state file. Each folder is written to a local work folder,
then copied to the run folder (a local path or a storage URI) with ``slim_ray.storage``. An
export is only trusted once the stage's manifest is written after it: the stage drops the old
manifest before it replaces the exports, so a crash mid-copy never looks complete.
"""

from __future__ import annotations

import os
from typing import Any

from slim_ray import storage
from slim_ray.assets import hash_folder


def publish_dir(local_dir: str, uri: str) -> None:
    """Replace the folder at ``uri`` (local path or storage URI) by ``local_dir``'s content.
    The stage's manifest, written after this, is what marks the export complete."""
    storage.delete_dir(uri)
    storage.upload_dir(local_dir, uri)


def export_student(
    checkpoint_dir: str, base_path: str, d, adapter_uri: str, merged_uri: str, work_dir: str,
) -> dict[str, Any]:
    """Write adapter (LoRA only) and merged model into ``work_dir`` (a local folder), publish them
    to ``adapter_uri`` / ``merged_uri``; return their URIs, local copies and content hashes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slim_ray.distill.strategy import consolidate

    state = consolidate(checkpoint_dir)
    base_dtype = getattr(AutoConfig.from_pretrained(base_path), "dtype", None) or torch.float32
    base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    out: dict[str, Any] = {}
    if d.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(base, d.lora_config())
        own = model.state_dict()
        lora_keys = [k for k in own if "lora_" in k]
        missing = [k for k in lora_keys if k not in state]
        if missing:
            raise RuntimeError(f"{checkpoint_dir}: checkpoint lacks LoRA weights, e.g. {missing[:2]}")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        local = os.path.join(work_dir, "adapter")
        model.save_pretrained(local)
        publish_dir(local, adapter_uri)
        out.update(adapter=adapter_uri, adapter_local=local, adapter_hash=hash_folder(local),
                   lora_tensors=len(lora_keys))
        merged = model.merge_and_unload()
    else:
        own = base.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise RuntimeError(f"{checkpoint_dir}: weights the base model lacks, e.g. {unknown[:2]}")
        base.load_state_dict(state, strict=False)
        merged = base
    if merged_uri:
        merged = merged.to(base_dtype)
        merged.config.use_cache = True
        local = os.path.join(work_dir, "merged")
        merged.save_pretrained(local, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(local)
        publish_dir(local, merged_uri)
        out.update(merged=merged_uri, merged_local=local, merged_hash=hash_folder(local),
                   merged_dtype=str(base_dtype))
    return out
