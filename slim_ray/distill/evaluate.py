"""How good is the student: held-out rationale loss / perplexity, and sample rationales.

``heldout_loss`` runs inside the Ray Train workers (before the first step and after the last):
each rank scores its share of the held-out pairs and the token-weighted mean is all-reduced.
Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively), so
ranks with fewer pairs run a zero-weight pass.

``generate_samples`` runs on the driver with the exported merged model: greedy student rationales
for held-out users, beside the teacher's.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def heldout_loss(strategy, examples: Sequence, batch_size: int, pad_id: int) -> Optional[float]:
    """Mean next-token loss over the rationale tokens of ``examples`` (None when there are none)."""
    import torch

    from slim_ray.distill.dataset import IGNORE_INDEX, collate

    if not examples:
        return None
    rank, ws = strategy.rank, strategy.world_size
    shard = list(examples[rank::ws])
    n_batches = math.ceil(math.ceil(len(examples) / ws) / batch_size)
    total, count = 0.0, 0.0
    strategy.train(False)
    with torch.no_grad():
        for b in range(n_batches):
            chunk, weight = shard[b * batch_size:(b + 1) * batch_size], 1.0
            if not chunk:
                chunk, weight = [examples[0]], 0.0
            batch = collate(chunk, pad_id)
            loss = float(strategy.loss(batch))
            n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += loss * n * weight
            count += n * weight
    strategy.train(True)
    total, count = strategy.all_reduce_sum([total, count])
    return total / count if count else None


def perplexity(loss: Optional[float]) -> Optional[float]:
    return math.exp(loss) if loss is not None else None


def generate_samples(
    model_dir: str, examples: Sequence, max_new_tokens: int = 160, dtype: str = "bfloat16",
) -> list[dict[str, Any]]:
    """Greedy student rationales for ``examples`` (dataset.Example) from an HF model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slim_ray.distill.dataset import _chat_prompt_text

    if not examples:
        return []
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    out = []
    for ex in examples:
        enc = tok(_chat_prompt_text(tok, ex.prompt), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                repetition_penalty=1.1, pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.append({"user_id": ex.user_id, "prompt": ex.prompt, "teacher": ex.teacher_text,
                    "student": text})
    return out
