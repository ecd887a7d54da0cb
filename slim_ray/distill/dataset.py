"""Distillation data: (student prompt p' -> teacher rationale) pairs, tokenized for the student.

Built once on the driver from the contracts (teacher rationales + sequences + items), then shipped
to the Ray Train workers as plain lists of token ids, so workers never need the input files.

Per usable teacher rationale (``error`` is null, non-empty text):
- p' is the student prompt built from the user's training-prefix items (``prefix_len`` of the
  rationale row -- the same leakage guard as the teacher's);
- the text is the student's chat template: ``user: p'`` + generation prompt, then the rationale and
  the end-of-turn token. Loss is on the rationale tokens only (prompt positions are masked);
- samples longer than ``max_length`` are cut (rationale tail first) and counted.
Users are split into train / held-out with a seeded permutation (held-out users never train).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

IGNORE_INDEX = -100
MIN_TARGET_TOKENS = 8


@dataclass
class Example:
    """One tokenized pair. ``input_ids[:n_prompt]`` is the prompt, the rest the rationale."""

    user_id: int
    input_ids: list[int]
    n_prompt: int
    messages: list = field(default_factory=list)  # p' as chat messages
    teacher_text: str = ""

    @property
    def prompt(self) -> str:
        return format_prompt(self.messages)

    @property
    def n_target(self) -> int:
        return len(self.input_ids) - self.n_prompt


@dataclass
class DistillData:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    data_hash: str = ""
    prompt_version: str = ""


# --------------------------------------------------------------------------- student prompt p'

Messages = list  # [{"role": ..., "content": ...}, ...]


def student_prompt_builder(cfg=None, items=None, tokenizer_path: Optional[str] = None):
    """(history_items -> p' chat messages, prompt version).

    With a pipeline config: exactly the builder the ``reason`` stage uses for the student
    (``slim_ray.generate.models.prompt_builder``: template, history length, token budget), so the
    student is trained on the prompts it will answer. Without one: the packaged student template.
    """
    from slim_ray.prompts import DEFAULT_TEMPLATE, build_messages, load_template, student_messages

    if cfg is not None:
        from slim_ray.generate.models import prompt_builder

        pb = prompt_builder(cfg, "student", items, tokenizer=tokenizer_path)
        return (lambda hist: build_messages(pb.template, hist, **pb.kw)[0]), pb.version
    return student_messages, load_template(DEFAULT_TEMPLATE["student"]).version


def format_prompt(messages: Messages) -> str:
    from slim_ray.prompts import format_messages

    return format_messages(messages)


# --------------------------------------------------------------------------- filters


def names_seen_item(step3: Optional[str], history: Sequence[dict], min_chars: int = 4) -> bool:
    """True when step 3 mentions the title of an item the user already has in the history."""
    from slim_ray.prompts import seen_titles  # the rule the generation stage reports too

    if not step3:
        return False
    return bool(seen_titles(step3, [it.get("title") or "" for it in history], min_chars))


# --------------------------------------------------------------------------- building


def chat_prompt_text(tokenizer, messages: Messages) -> str:
    """The student's chat template over p', ending with the assistant generation prompt."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The string that closes an assistant turn in the student's chat template."""
    return tokenizer.eos_token or ""


def tokenize_pair(tokenizer, messages: Messages, target: str, max_length: int) -> tuple[list[int], int, bool]:
    """Token ids of chat(p')+target+EOT, the prompt length, and whether it was cut."""
    p_ids = tokenizer(chat_prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(target + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    ids = p_ids + t_ids
    truncated = len(ids) > max_length
    return ids[:max_length], len(p_ids), truncated


def split_users(user_ids: Sequence[int], fraction: float, min_users: int, seed: int) -> set[int]:
    """Seeded held-out users (a set), never all of them."""
    users = sorted(set(int(u) for u in user_ids))
    if len(users) < 2 or (fraction <= 0 and min_users <= 0):
        return set()
    n = max(min_users, int(round(fraction * len(users))))
    n = min(n, len(users) - 1)
    perm = np.random.default_rng(seed).permutation(len(users))
    return {users[i] for i in perm[:n]}


def build_dataset(
    rationales,
    sequences,
    items,
    tokenizer,
    *,
    max_length: int,
    eval_fraction: float,
    min_eval_users: int,
    seed: int,
    max_samples: Optional[int] = None,
    drop_missing_steps: bool = False,
    drop_seen_items: bool = False,
    source: str = "rationales",
    prompt_builder=None,
) -> DistillData:
    """Pairs from pyarrow tables of the three contracts. Errors name ``source`` and the row.
    ``prompt_builder``: (history -> messages, version); default ``student_prompt_builder()``.

    Phases: keep the usable rationales (``_usable_rows``), sample ``max_samples`` of them (seeded),
    split users, tokenize (``_tokenize_pairs``), count."""
    build_prompt, prompt_version = prompt_builder or student_prompt_builder()
    stats = {"rows": rationales.num_rows, "skipped_error": 0, "skipped_empty": 0,
             "skipped_missing_steps": 0, "skipped_seen_items": 0, "skipped_too_long": 0,
             "duplicate_users": 0, "truncated": 0}
    usable = _usable_rows(rationales, sequences, items, stats, drop_missing_steps=drop_missing_steps,
                          drop_seen_items=drop_seen_items, source=source)
    if max_samples is not None and len(usable) > max_samples:
        keep = sorted(np.random.default_rng(seed + 1).permutation(len(usable))[:max_samples])
        usable = [usable[k] for k in keep]

    held_out = split_users([r["user_id"] for r, _ in usable], eval_fraction, min_eval_users, seed)
    train, evals, h = _tokenize_pairs(usable, held_out, build_prompt, tokenizer, max_length, stats)
    h.update(json.dumps([max_length, prompt_version]).encode())

    stats.update(
        train=len(train), eval=len(evals),
        train_tokens=sum(len(e.input_ids) for e in train),
        train_target_tokens=sum(e.n_target for e in train),
        eval_target_tokens=sum(e.n_target for e in evals),
    )
    if not train:
        hint = ""
        if stats["skipped_too_long"]:
            hint = (" -- the student prompts alone exceed distill.max_length: raise it, or shorten p' "
                    "(student.max_history_items / student.prompt_token_budget)")
        raise ValueError(f"{source}: no usable teacher rationales for training (stats: {stats}){hint}")
    return DistillData(train, evals, stats, h.hexdigest(), prompt_version)


def _usable_rows(rationales, sequences, items, stats: dict[str, Any], *, drop_missing_steps: bool,
                 drop_seen_items: bool, source: str) -> list[tuple[dict, list[dict]]]:
    """(rationale row, history item rows) of every usable rationale, one per user (the first in
    file order); skips are counted in ``stats``. A row that breaks a contract raises, naming it."""
    item_rows = {
        int(r["item_id"]): r for r in items.select(
            [c for c in ("item_id", "title", "categories", "year", "brand", "text") if c in items.column_names]
        ).to_pylist()
    }
    seqs = {int(r["user_id"]): r["item_ids"] for r in sequences.select(["user_id", "item_ids"]).to_pylist()}
    rows = rationales.select(
        ["rationale_key", "user_id", "prefix_len", "text", "step1", "step2", "step3", "error"]
    ).to_pylist()
    usable = []
    seen_users: set[int] = set()
    for i, r in enumerate(rows):
        if r["error"] is not None:
            stats["skipped_error"] += 1
            continue
        if not (r["text"] or "").strip():
            stats["skipped_empty"] += 1
            continue
        uid = int(r["user_id"])
        if uid in seen_users:  # one rationale per user: the first in file order
            stats["duplicate_users"] += 1
            continue
        if uid not in seqs:
            raise ValueError(f"{source}: row {i} (user_id={uid}): user not in sequences")
        item_ids = seqs[uid]
        plen = r["prefix_len"]
        if plen is None or plen < 1 or plen > len(item_ids) - 2:
            raise ValueError(
                f"{source}: row {i} (user_id={uid}): prefix_len={plen} breaks the leakage guard "
                f"(1 <= prefix_len <= len(item_ids) - 2 = {len(item_ids) - 2})"
            )
        history = []
        for iid in item_ids[:plen]:
            if int(iid) not in item_rows:
                raise ValueError(f"{source}: row {i} (user_id={uid}): item_id {iid} not in items")
            history.append(item_rows[int(iid)])
        if drop_missing_steps and not all((r[k] or "").strip() for k in ("step1", "step2", "step3")):
            stats["skipped_missing_steps"] += 1
            continue
        if drop_seen_items and names_seen_item(r["step3"] or r["text"], history):
            stats["skipped_seen_items"] += 1
            continue
        seen_users.add(uid)
        usable.append((r, history))
    return usable


def _tokenize_pairs(usable, held_out: set[int], build_prompt, tokenizer, max_length: int,
                    stats: dict[str, Any]):
    """(train examples, held-out examples, data hash so far). Pairs whose rationale keeps fewer
    than ``MIN_TARGET_TOKENS`` tokens after the cut are skipped as too long."""
    train, evals = [], []
    h = hashlib.sha256()
    for r, history in usable:
        messages = build_prompt(history)
        ids, n_prompt, cut = tokenize_pair(tokenizer, messages, r["text"], max_length)
        if len(ids) - n_prompt < MIN_TARGET_TOKENS:
            stats["skipped_too_long"] += 1
            continue
        stats["truncated"] += int(cut)
        h.update(json.dumps([r["rationale_key"], messages, r["text"], int(r["user_id"] in held_out)]).encode())
        ex = Example(int(r["user_id"]), ids, n_prompt, messages, r["text"])
        (evals if ex.user_id in held_out else train).append(ex)
    return train, evals, h


def load_dataset(cfg, tokenizer, tokenizer_path: Optional[str] = None) -> DistillData:
    """``build_dataset`` over the run folder of a PipelineConfig, with the reason stage's p'."""
    from slim_ray.data.io import read_items, read_rationales, read_sequences

    lay, d = cfg.layout, cfg.distill
    path = lay.rationales("teacher")
    items = read_items(lay.items)
    return build_dataset(
        read_rationales(path), read_sequences(lay.sequences), items, tokenizer,
        prompt_builder=student_prompt_builder(cfg, items, tokenizer_path),
        max_length=d.max_length, eval_fraction=d.eval_fraction, min_eval_users=d.min_eval_users,
        seed=cfg.seed, max_samples=d.max_samples, drop_missing_steps=d.drop_missing_steps,
        drop_seen_items=d.drop_seen_items, source=path,
    )


# --------------------------------------------------------------------------- batching


def collate(examples: Sequence[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (prompt and padding masked)."""
    import torch

    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids)
        mask[i, :L] = 1
        labels[i, e.n_prompt:L] = ids[i, e.n_prompt:L]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Sample indices of optimizer step ``step`` (0-based): a pure function of the step, so a
    restored run continues at exactly the data position it checkpointed. Each epoch is a seeded
    permutation; a step that runs past the end wraps into the next epoch's permutation."""
    out = []
    start = step * global_batch
    for pos in range(start, start + global_batch):
        epoch, k = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[k]))
    return out
