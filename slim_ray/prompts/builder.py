"""Build a user's prompt from the training prefix of their sequence.

Leakage guard: a prompt only ever sees ``item_ids[:-2]`` (the last two items are the validation
and test targets); ``training_prefix`` is the only way the pipeline cuts a sequence, and
``PromptBuilder.build`` asserts the prefix length it reports.

Rationale cut: a rationale is fused into the recommender at training positions too, so by default
(``cut="consistent"``) it is written from only the first ``c`` items of the training prefix (see
``cut_length``): the training targets after ``c`` were never read by it, as the test target never
is. ``cut="full_prefix"`` writes it from the whole training prefix (the earlier behaviour).

History rendering: one line per item (title, year, categories, brand -- missing parts left out),
**most recent first**, as many items as fit in ``max_items`` and ``token_budget`` (tokens counted
with the model's tokenizer when given, else ~4 characters per token). At least one item is shown.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from slim_ray.data import splits
from slim_ray.prompts.templates import DEFAULT_TEMPLATE, Template, load_template

CountTokens = Callable[[list[str]], list[int]]

_YEAR_SUFFIX = re.compile(r"\((1[89]\d\d|20\d\d)\)\s*$")

#: Words used in the prompt per data source (PrepareConfig.source).
NOUNS = {"movielens": ("movies", "genres"), "amazon": ("products", "categories")}


def nouns_for(source: Optional[str]) -> tuple[str, str]:
    """(item noun, category label) for a data source: movies/genres, products/categories, items/categories."""
    return NOUNS.get(source or "", ("items", "categories"))


#: The rationale cuts (GenerateConfig.rationale_cut).
CUTS = ("consistent", "full_prefix")


def cut_length(n_train: int, cut: str = "full_prefix", tail_fraction: float = 0.2, min_tail: int = 3) -> int:
    """Items of a training prefix of ``n_train`` items that a rationale is written from.

    full_prefix: all of them. consistent: ``max(1, min(n_train - min_tail, floor(n_train * (1 -
    tail_fraction))))``, leaving at least ``min_tail`` (and about ``tail_fraction``) of the training
    targets unseen. A very short user (``n_train <= min_tail + 1``) keeps 1 item, so fewer than
    ``min_tail`` targets remain after the cut; an empty prefix stays empty."""
    if cut not in CUTS:
        raise ValueError(f"unknown rationale cut {cut!r} (expected one of {', '.join(CUTS)})")
    if n_train <= 0:
        return 0
    if cut == "full_prefix":
        return n_train
    keep = math.floor(n_train * (1.0 - tail_fraction) + 1e-9)
    return max(1, min(n_train - min_tail, keep))


def training_prefix(item_ids: Sequence[int], cut: str = "full_prefix", tail_fraction: float = 0.2,
                    min_tail: int = 3) -> list[int]:
    """The part of a time-ordered sequence a rationale may see: all but the last two items (the
    training prefix), cut to its first ``cut_length`` items for ``cut="consistent"``."""
    prefix = splits.training_prefix(list(item_ids))
    return prefix[:cut_length(len(prefix), cut, tail_fraction, min_tail)]


def item_title(item: Mapping[str, Any]) -> str:
    """An item's title as prompts show it: ``Godfather, The (1972)`` (the year appended when the
    title does not end with one). Step 3 grounding and its constrained decoding use the same form."""
    title = (item.get("title") or "").strip() or f"item {item.get('item_key') or item.get('item_id')}"
    year = item.get("year")
    if year is not None and not _YEAR_SUFFIX.search(title):
        title = f"{title} ({int(year)})"
    return title


def render_item(item: Mapping[str, Any], category_label: str = "categories") -> str:
    """``Toy Story (1995) | genres: Animation, Comedy | brand: Pixar`` (missing parts left out)."""
    parts = [item_title(item)]
    cats = [c for c in (item.get("categories") or []) if c]
    if cats:
        parts.append(f"{category_label}: {', '.join(cats)}")
    if item.get("brand"):
        parts.append(f"brand: {item['brand']}")
    return " | ".join(parts)


def approx_count_tokens(lines: list[str]) -> list[int]:
    return [max(1, len(s) // 4) for s in lines]


def select_history(
    history_items: Sequence[Mapping[str, Any]],
    *,
    max_items: int = 50,
    token_budget: Optional[int] = 512,
    count_tokens: Optional[CountTokens] = None,
    category_label: str = "categories",
) -> list[str]:
    """Rendered lines of the most recent items (``history_items`` is in time order, oldest first),
    most recent first, within ``max_items`` and ``token_budget`` tokens. Never empty for a
    non-empty history."""
    recent = list(history_items)[::-1][:max_items]
    lines = [render_item(it, category_label) for it in recent]
    if token_budget is None or not lines:
        return lines
    costs = (count_tokens or approx_count_tokens)([f"{i + 1}. {s}\n" for i, s in enumerate(lines)])
    out, used = [], 0
    for line, cost in zip(lines, costs):
        if out and used + cost > token_budget:
            break
        out.append(line)
        used += cost
    return out


def build_messages(
    template: Template | str,
    history_items: Sequence[Mapping[str, Any]],
    *,
    item_noun: str = "items",
    category_label: str = "categories",
    max_items: int = 50,
    token_budget: Optional[int] = 512,
    count_tokens: Optional[CountTokens] = None,
    n_recs: int = 5,
) -> tuple[list[dict[str, str]], int]:
    """Chat messages for one user and the number of history items shown."""
    tpl = load_template(template) if isinstance(template, str) else template
    lines = select_history(
        history_items, max_items=max_items, token_budget=token_budget,
        count_tokens=count_tokens, category_label=category_label,
    )
    history = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(lines))
    msgs = tpl.render(noun=item_noun, category_label=category_label, history=history,
                      n_shown=len(lines), n_recs=n_recs)
    return msgs, len(lines)


def student_messages(history_items: Sequence[Mapping[str, Any]], **kw: Any) -> list[dict[str, str]]:
    """The student's prompt p' as chat messages (system + user). ``history_items``: the user's
    training-prefix items in time order (oldest first), each a mapping with title, categories,
    brand, year. Keyword arguments as ``build_messages`` (item_noun, category_label, max_items,
    token_budget, count_tokens)."""
    return build_messages(DEFAULT_TEMPLATE["student"], history_items, **kw)[0]


def build_student_prompt(history_items: Sequence[Mapping[str, Any]], **kw: Any) -> str:
    """The student's prompt p' as one string (``format_messages`` of ``student_messages``)."""
    return format_messages(student_messages(history_items, **kw))


def teacher_messages(history_items: Sequence[Mapping[str, Any]], **kw: Any) -> list[dict[str, str]]:
    """The teacher's 3-step CoT prompt as chat messages (same arguments as ``student_messages``)."""
    return build_messages(DEFAULT_TEMPLATE["teacher"], history_items, **kw)[0]


def build_teacher_prompt(history_items: Sequence[Mapping[str, Any]], **kw: Any) -> str:
    return format_messages(teacher_messages(history_items, **kw))


def format_messages(messages: Sequence[Mapping[str, str]]) -> str:
    """A readable, canonical text of chat messages: what the ``prompt`` column stores and what
    ``rationale_key`` hashes (``[system]\\n...\\n\\n[user]\\n...``)."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def parse_messages(prompt: str) -> list[dict[str, str]]:
    """Inverse of ``format_messages``."""
    msgs = []
    for block in re.split(r"(?:^|\n\n)\[(system|user|assistant)\]\n", prompt)[1:]:
        if block in ("system", "user", "assistant"):
            msgs.append({"role": block, "content": ""})
        else:
            msgs[-1]["content"] = block
    return msgs


def rationale_key(model_id: str, prompt_version: str, sampling: Mapping[str, Any], prompt: str) -> str:
    """sha256 of model id + prompt version + sampling params + prompt text (the rationales contract)."""
    blob = json.dumps(
        {"model": model_id, "prompt_version": prompt_version, "sampling": dict(sampling), "prompt": prompt},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class BuiltPrompt:
    messages: list[dict[str, str]]
    prompt: str  # format_messages(messages)
    prefix_len: int  # items the rationale is written from: the cut c (<= len(item_ids) - 2)
    n_shown: int  # items rendered in the prompt (most recent first)
    history_titles: list[str]  # titles of the whole training prefix (for the "already seen" flag)


class PromptBuilder:
    """Prompts for users from the items table (held in memory: a dict of small dicts per item).

    >>> pb = PromptBuilder(items_table, role="student", item_noun="movies", category_label="genres")
    >>> built = pb.build(item_ids)          # full time-ordered sequence; only item_ids[:-2] is used
    >>> built.messages, built.prompt, built.prefix_len

    ``cut``/``tail_fraction``/``min_tail``: the rationale cut (``cut_length``); ``build`` renders
    only ``item_ids[:prefix_len]``.
    """

    def __init__(
        self,
        items: Any,
        *,
        role: str = "teacher",
        template: Optional[str] = None,
        item_noun: str = "items",
        category_label: str = "categories",
        max_items: int = 50,
        token_budget: Optional[int] = 512,
        count_tokens: Optional[CountTokens] = None,
        n_recs: int = 5,
        cut: str = "full_prefix",
        tail_fraction: float = 0.2,
        min_tail: int = 3,
    ):
        self.template = load_template(template or DEFAULT_TEMPLATE[role])
        cut_length(1, cut)  # an unknown cut fails here, not per user
        self.cut = dict(cut=cut, tail_fraction=tail_fraction, min_tail=min_tail)
        cols = ["item_id", "title", "categories", "brand", "year"]
        data = items.select([c for c in cols if c in items.column_names]).to_pylist() if hasattr(items, "select") else list(items)
        self.items = {int(r["item_id"]): r for r in data}
        self.kw = dict(item_noun=item_noun, category_label=category_label, max_items=max_items,
                       token_budget=token_budget, count_tokens=count_tokens, n_recs=n_recs)

    @property
    def version(self) -> str:
        return self.template.version

    def history(self, prefix_ids: Sequence[int]) -> list[Mapping[str, Any]]:
        out = []
        for i in prefix_ids:
            item = self.items.get(int(i))
            if item is None:
                raise KeyError(f"item_id {int(i)} is in a sequence but not in the items table")
            out.append(item)
        return out

    def build(self, item_ids: Sequence[int]) -> BuiltPrompt:
        """Prompt from a user's full sequence; only the cut training prefix is rendered."""
        prefix = training_prefix(item_ids, **self.cut)
        assert len(prefix) <= splits.training_length(len(item_ids)), "leakage guard: prefix must exclude valid/test"
        hist = self.history(prefix)
        msgs, n_shown = build_messages(self.template, hist, **self.kw)
        return BuiltPrompt(
            messages=msgs,
            prompt=format_messages(msgs),
            prefix_len=len(prefix),
            n_shown=n_shown,
            history_titles=[h.get("title") or "" for h in hist],
        )
