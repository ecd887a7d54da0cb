"""What a generation stage loads and how it prompts, shared with the stages and services that
must do exactly the same: the distill stage builds the student's training prompts with
``prompt_builder``, the Serve reasoner resolves and prompts the student with ``resolve_model`` and
``prompt_builder``. Kept out of ``stage.py`` so that none of them imports a stage runner.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import pyarrow as pa

from slim_ray import storage
from slim_ray.data.schemas import ITEMS_SCHEMA, check_columns
from slim_ray.generate.config import GenerateConfig
from slim_ray.generate.engines import EngineError, ModelSpec, check_endpoint, check_vllm, local_model

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Bad input or a failed engine; the message names the file, field or endpoint."""


# ------------------------------------------------------------------------------------ model


def _folder_id(path: str) -> str:
    """Identity of a model folder: its location plus a hash of its content (local) or of its
    file listing (storage)."""
    if not storage.is_local(path):
        return f"{storage.normalize(path)}#{storage.content_key(path)[:12]}"
    from slim_ray.assets import hash_folder

    return f"{os.path.abspath(path)}#{hash_folder(path, max_bytes=1 << 20)[:12]}"


def _distilled_model(cfg, gen: GenerateConfig, local) -> ModelSpec:
    """The distill stage's export (merged folder or LoRA adapter), possibly on storage."""
    from slim_ray.assets import LLMS, is_local_folder

    lay = cfg.layout
    adapter, merged = lay.student_adapter, lay.student_merged
    has_adapter = storage.is_file(storage.join(adapter, "adapter_config.json"))
    has_merged = storage.is_file(storage.join(merged, "config.json"))
    if gen.engine == "openai":
        return ModelSpec(gen.model, f"openai:{gen.model}", gen.model, tokenizer=merged if has_merged else None)
    if has_adapter and (gen.engine == "vllm" or not has_merged):
        base_name = (storage.read_json(storage.join(adapter, "adapter_config.json"), {}) or {}).get(
            "base_model_name_or_path")
        if not base_name:
            raise EngineError(f"{adapter}/adapter_config.json: no base_model_name_or_path")
        base = base_name if is_local_folder(base_name) else local(base_name)
        return ModelSpec("distilled", f"lora:{_folder_id(adapter)}@{_folder_id(base)}", base,
                         adapter=storage.normalize(adapter), tokenizer=base)
    if has_merged:
        return ModelSpec("distilled", f"merged:{_folder_id(merged)}", storage.normalize(merged), tokenizer=merged)
    raise EngineError(
        f"{gen.role}.model='distilled' needs the distill stage's export: {merged} (merged HF "
        f"folder) or {adapter} (LoRA adapter). Run `slim-ray distill` first, or set "
        f"{gen.role}.model to a packaged model ({', '.join(sorted(LLMS))}) or an HF folder."
    )


def resolve_model(cfg, gen: GenerateConfig) -> ModelSpec:
    """Where the engine's weights come from, and the model id that goes into rationale_key.

    A folder on storage stays a URI here: the engine replicas fetch it (``storage.local_copy``)."""
    from slim_ray.assets import LLMS, is_local_folder, model_id, resolve_llm

    def local(name: str) -> str:
        try:
            return resolve_llm(name, cache=cfg.cache_dir)
        except Exception as e:
            raise EngineError(f"{gen.role}.model '{name}': {e}") from None

    if gen.model == "distilled":
        return _distilled_model(cfg, gen, local)
    if gen.engine == "openai":
        tok = gen.tokenizer or (gen.model if (gen.model in LLMS or is_local_folder(gen.model)) else None)
        mid = model_id(gen.model) if (gen.model in LLMS) else f"openai:{gen.model}"
        return ModelSpec(gen.model, mid, gen.model, tokenizer=local(tok) if tok else None)
    path = local(gen.model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EngineError(f"{gen.role}.model '{gen.model}': {path} has no config.json (not an HF model folder)")
    mid = model_id(gen.model) if gen.model in LLMS else _folder_id(path)
    tok = local(gen.tokenizer) if gen.tokenizer else path
    return ModelSpec(gen.model, mid, path, tokenizer=tok)


def preflight(gen: GenerateConfig, spec: ModelSpec) -> None:
    """Fail before any work when the engine cannot possibly run."""
    if gen.engine == "openai":
        served = check_endpoint(gen)
        if served and spec.path not in served:
            logger.warning("endpoint %s serves %s, not '%s'; sending it anyway", gen.base_url, served, spec.path)
        return
    if gen.engine == "vllm":
        check_vllm()
    if not storage.is_local(spec.path):  # fetched by each replica; not downloaded to the driver
        if not storage.is_file(storage.join(spec.path, "config.json")):
            raise EngineError(f"{gen.role}.model: {spec.path} has no config.json (not an HF model folder)")
        return
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(spec.path)
        AutoTokenizer.from_pretrained(spec.tokenizer or spec.path)
    except Exception as e:
        raise EngineError(f"{gen.role}.model: cannot load {spec.path}: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------ prompts


def prompt_settings(cfg, gen: GenerateConfig) -> dict[str, Any]:
    """Builder settings of a stage (the distill stage uses ``prompt_builder`` with the same)."""
    from slim_ray.prompts import nouns_for

    noun, label = nouns_for(getattr(cfg.data, "source", None))
    return dict(
        role=gen.role, template=gen.template, item_noun=gen.item_noun or noun,
        category_label=gen.category_label or label, max_items=gen.max_history_items,
        token_budget=gen.prompt_token_budget, n_recs=gen.n_recs,
        cut=gen.rationale_cut, tail_fraction=gen.cut_tail_fraction, min_tail=gen.cut_min_tail,
    )


def token_counter(tokenizer_path: Optional[str]):
    """count_tokens(lines) with a tokenizer folder (local, or on storage: fetched once per node);
    None (~4 chars/token) without one."""
    if not tokenizer_path:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_model(tokenizer_path))
    return lambda lines: [len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"]]


def prompt_builder(cfg, role: str, items: Optional[pa.Table] = None, tokenizer: Optional[str] = "auto"):
    """The exact PromptBuilder the ``teach`` (role teacher) or ``reason`` (role student) stage uses.
    ``tokenizer="auto"``: the stage model's tokenizer (``resolve_model``)."""
    from slim_ray.prompts import PromptBuilder

    gen = cfg.teacher if role == "teacher" else cfg.student
    if tokenizer == "auto":
        tokenizer = resolve_model(cfg, gen).tokenizer
    items = items if items is not None else read_items(cfg.layout.items)
    return PromptBuilder(items, count_tokens=token_counter(tokenizer), **prompt_settings(cfg, gen))



# ------------------------------------------------------------------------------------ inputs


def read_items(path: str) -> pa.Table:
    """The items contract (a folder of parts, local or on storage), columns checked."""
    t = storage.read_table(path)
    if t is None:
        raise GenerationError(f"{path}: no items (Parquet) -- run `slim-ray prepare` first")
    check_columns(t.schema, ITEMS_SCHEMA, path)
    return t
