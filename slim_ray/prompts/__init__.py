"""Prompts of the teacher and the student, and the parser of their answers.

Templates are versioned text files (``slim_ray/prompts/templates/*.txt``); the version string is
part of every ``rationale_key``. Packaged templates: ``teacher_cot`` (version ``teacher-cot-v1``,
the 3-step zero-shot CoT prompt) and ``student`` (``student-v1``, the simplified prompt p').

Public API (what distillation and serving reuse, so training and inference see the same p')::

    from slim_ray.prompts import (
        PromptBuilder, training_prefix, student_messages, build_student_prompt,
        teacher_messages, build_teacher_prompt, format_messages, parse_messages,
        parse_answer, rationale_key, load_template, nouns_for,
    )

    # From plain item dicts (time order, oldest first; keys title, categories, brand, year):
    msgs = student_messages(history_items, item_noun="movies", category_label="genres")
    text = build_student_prompt(history_items, item_noun="movies", category_label="genres")

    # From the contracts (items table + one user's full item_ids; the builder cuts the
    # training prefix item_ids[:-2] itself -- the leakage guard -- and, with
    # cut="consistent", keeps only its first cut_length(...) items):
    pb = PromptBuilder(items_table, role="student", item_noun="movies", category_label="genres",
                       max_items=50, token_budget=512, count_tokens=None)
    built = pb.build(item_ids)   # .messages, .prompt, .prefix_len, .n_shown, .history_titles

    # Distillation pairs: tokenizer.apply_chat_template(built.messages + [{"role": "assistant",
    # "content": teacher_text}]) and the loss on the assistant tokens only.
    # Generation (reason stage) applies the same chat template with add_generation_prompt=True.

``GenerateConfig`` (slim_ray.generate.config) holds the builder settings a run used
(max_history_items, prompt_token_budget, template); ``slim_ray.generate.models.prompt_builder(cfg,
role, items, tokenizer)`` builds the exact PromptBuilder of a stage from a pipeline config.
"""

from slim_ray.prompts.builder import (
    CUTS,
    BuiltPrompt,
    PromptBuilder,
    approx_count_tokens,
    build_messages,
    build_student_prompt,
    build_teacher_prompt,
    cut_length,
    format_messages,
    item_title,
    nouns_for,
    parse_messages,
    rationale_key,
    render_item,
    select_history,
    student_messages,
    teacher_messages,
    training_prefix,
)
from slim_ray.prompts.parser import ParsedAnswer, normalize_title, parse_answer, seen_titles, split_steps
from slim_ray.prompts.templates import DEFAULT_TEMPLATE, Template, load_template, parse_template

__all__ = [
    "CUTS", "cut_length", "BuiltPrompt", "PromptBuilder", "approx_count_tokens", "build_messages", "build_student_prompt",
    "build_teacher_prompt", "format_messages", "item_title", "nouns_for", "parse_messages", "rationale_key",
    "render_item", "select_history", "student_messages", "teacher_messages", "training_prefix",
    "ParsedAnswer", "normalize_title", "parse_answer", "seen_titles", "split_steps",
    "DEFAULT_TEMPLATE", "Template", "load_template", "parse_template",
]
