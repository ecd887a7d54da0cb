"""The student reasoner used at serving time: a user's raw history -> a step-by-step rationale.

Plain Python (no Ray): ``Reasoner(cfg).reason(item_ids)``. It reuses the ``reason`` stage's own
pieces, so a served rationale is written exactly like a batch one: the student's prompt p'
(``slim_ray.generate.models.prompt_builder``: same template, history rendering and token budget)
and the ``hf`` engine (``slim_ray.generate.engines.HFEngine``: chat template, bf16 when supported).
Two differences, both for serving: the *whole* given history is shown (a request's history has
no held-out targets to hide), and decoding is greedy with at most ``serve.reasoner_max_new_tokens``
tokens, so the same history always gives the same rationale.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

logger = logging.getLogger(__name__)

PACKAGED_STUDENT = "smollm2-135m-instruct"


def reasoner_generate_config(cfg):
    """The student's GenerateConfig, pointed at the model the reasoner serves (always engine=hf):
    serve.reasoner_model > student.model (``distilled``: the run's export) > the packaged student
    when the run has no distilled export yet (with a warning: it is not distilled)."""
    gen = cfg.student
    model = cfg.serve.reasoner_model or gen.model
    if model == "distilled":
        lay = cfg.layout
        from slim_ray import storage

        exported = storage.is_file(storage.join(lay.student_merged, "config.json")) or storage.is_file(
            storage.join(lay.student_adapter, "adapter_config.json"))
        if not exported:
            logger.warning("no distilled student under %s: the reasoner serves the packaged %s (not distilled)",
                           lay.distill, PACKAGED_STUDENT)
            model = PACKAGED_STUDENT
    return gen.model_copy(update={"model": model, "engine": "hf", "temperature": 0.0,
                                  "max_new_tokens": cfg.serve.reasoner_max_new_tokens, "min_new_tokens": 0})


class Reasoner:
    """Student prompt + hf engine for one process (a Serve replica, or a plain script)."""

    def __init__(self, cfg, threads: int | None = None):
        from slim_ray.generate.engines import HFEngine, sampling_params
        from slim_ray.generate.models import prompt_builder, resolve_model

        gen = reasoner_generate_config(cfg)
        spec = resolve_model(cfg, gen)
        self.model_id = spec.model_id
        self.pb = prompt_builder(cfg, "student", tokenizer=spec.tokenizer)
        self.adapter_sha256 = None
        if spec.adapter:
            from slim_ray import storage
            from slim_ray.assets import hash_folder

            self.adapter_sha256 = hash_folder(storage.local_copy(spec.adapter))
        self.engine = HFEngine(spec.path, sampling_params(gen), dtype=gen.dtype, threads=threads,
                               seed=cfg.seed, adapter=spec.adapter)

    @property
    def version(self) -> dict:
        """The student being served: its model id and, for a LoRA export, the adapter's content hash."""
        return {"model": self.model_id, "adapter_sha256": self.adapter_sha256}

    def probe(self) -> str:
        """Health probe: the model is loaded and the tokenizer renders a prompt."""
        if self.engine.model is None:
            raise RuntimeError("the student model is not loaded")
        n = len(self.engine.tok("health probe")["input_ids"])
        if n <= 0:
            raise RuntimeError("the student's tokenizer gave no tokens")
        return f"{self.model_id}: loaded"

    def reason(self, item_ids: Sequence[int]) -> dict[str, Any]:
        """-> {"text", "steps", "n_shown", "n_prompt_tokens", "n_output_tokens", "seconds", "model"}."""
        return self.reason_many([item_ids])[0]

    def reason_many(self, histories: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """One rationale per history, all in one ``generate`` call (a served batch)."""
        from slim_ray.prompts import build_messages, parse_answer

        if any(not h for h in histories):
            raise ValueError("the reasoner needs a non-empty history")
        hists = [self.pb.history(item_ids) for item_ids in histories]  # KeyError naming an unknown item id
        built = [build_messages(self.pb.template, hist, **self.pb.kw) for hist in hists]
        t0 = time.perf_counter()
        outs = self.engine.generate([msgs for msgs, _ in built])
        seconds = round(time.perf_counter() - t0, 3)
        results = []
        for hist, (_, n_shown), (text, n_in, n_out) in zip(hists, built, outs):
            parsed = parse_answer(text, [h.get("title") or "" for h in hist])
            results.append({
                "text": text,
                "steps": [parsed.step1, parsed.step2, parsed.step3],
                "n_shown": n_shown,
                "n_prompt_tokens": n_in,
                "n_output_tokens": n_out,
                "seconds": seconds,
                "model": self.model_id,
            })
        return results
