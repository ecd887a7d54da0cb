"""The student reasoner used at serving time: a user's raw history -> a step-by-step rationale.

Plain Python (no Ray): ``Reasoner(model).reason(history_texts)``. The serving graph wraps it in a
deployment for users that have no stored rationale (new users, or a history given in the request).
Decoding is greedy, so the same history gives the same rationale.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

PACKAGED_STUDENT = "smollm2-135m-instruct"


def resolve_reasoner_model(cfg) -> str:
    """serve.reasoner_model > the run's distilled merged student > the packaged student."""
    s = cfg.serve
    if s.reasoner_model:
        return s.reasoner_model
    merged = cfg.layout.student_merged
    if os.path.isdir(merged) and os.path.exists(os.path.join(merged, "config.json")):
        return merged
    if cfg.student.model not in ("distilled", ""):
        return cfg.student.model
    logger.warning("no distilled student at %s: the reasoner serves the packaged %s (not distilled)",
                   merged, PACKAGED_STUDENT)
    return PACKAGED_STUDENT


def student_messages(history_texts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages of the simplified student prompt p' (history -> three reasoning steps)."""
    items = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(history_texts))
    return [
        {"role": "system", "content": "You are a helpful shopping assistant."},
        {"role": "user", "content": (
            f"A user interacted with these items, oldest first:\n{items}\n"
            "Think step by step. Step 1: summarise the user's preferences. Step 2: recommend "
            "categories that fit them. Step 3: recommend specific items in those categories.")},
    ]


class Reasoner:
    """A causal LM (packaged name or HF folder) writing rationales, bf16 on CPU, greedy."""

    def __init__(self, model: str, max_new_tokens: int = 96, dtype: str = "bfloat16",
                 device: str = "auto", cache_dir: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from slim_ray.assets import model_id, resolve_llm

        path = resolve_llm(model, cache=cache_dir)
        self.model_id = model_id(model)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    def reason(self, history_texts: Sequence[str]) -> dict:
        """-> {"text", "n_prompt_tokens", "n_output_tokens", "seconds", "model"}."""
        import torch

        if not history_texts:
            raise ValueError("the reasoner needs a non-empty history")
        msgs = student_messages(history_texts)
        prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = self.tok(prompt, return_tensors="pt").to(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        return {
            "text": self.tok.decode(new, skip_special_tokens=True).strip(),
            "n_prompt_tokens": int(enc["input_ids"].shape[1]),
            "n_output_tokens": int(new.shape[0]),
            "seconds": round(time.perf_counter() - t0, 3),
            "model": self.model_id,
        }
