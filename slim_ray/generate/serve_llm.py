"""``slim-ray serve-llm``: an OpenAI-compatible chat endpoint on Ray Serve around an HF model.

    slim-ray serve-llm --model smollm2-135m-instruct --port 8000          # http://127.0.0.1:8000/v1
    slim-ray teach --set teacher.engine=openai teacher.model=smollm2-135m-instruct \\
                   teacher.base_url=http://127.0.0.1:8000/v1

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming; fields model, messages,
max_tokens, temperature, top_p, seed, plus the extensions repetition_penalty and min_tokens).
Requests arriving together are batched (``@serve.batch``) into one padded ``generate`` per
replica. Bound to 127.0.0.1 unless ``--host`` says otherwise. For a GPU cluster ``vllm serve``
speaks the same protocol; this endpoint exists for CPU clusters and for the tests of the openai
engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
import time
import uuid
from typing import Any, Optional

logger = logging.getLogger(__name__)

APP_NAME = "slim-llm"


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _parse_chat_request(body: Any, name: str, d: dict):
    """(messages, sampling tuple) of a chat completion request, or an OpenAI-style error response."""
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object")
    model = body.get("model", name)
    if model != name:
        return _error(404, f"model '{model}' is not served here; this endpoint serves '{name}'", "model_not_found")
    msgs = body.get("messages")
    if (not isinstance(msgs, list) or not msgs
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs)):
        return _error(400, "'messages' must be a non-empty list of {role, content} objects")
    if body.get("stream"):
        return _error(400, "stream=true is not supported by this endpoint")
    try:
        sampling = (
            ("max_new_tokens", int(body.get("max_tokens") or body.get("max_completion_tokens") or d["max_new_tokens"])),
            ("min_new_tokens", int(body.get("min_tokens") or 0)),
            ("temperature", float(body.get("temperature", d["temperature"]))),
            ("top_p", float(body.get("top_p", d["top_p"]))),
            ("repetition_penalty", float(body.get("repetition_penalty", d["repetition_penalty"]))),
        )
    except (TypeError, ValueError) as e:
        return _error(400, f"bad sampling parameter: {e}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs], sampling


def make_deployment(num_cpus: float = 1.0, replicas: int = 1, max_batch_size: int = 8, batch_wait_s: float = 0.05):
    from ray import serve

    @serve.deployment(name="ChatLLM", num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=max(16, 2 * max_batch_size))
    class ChatLLM:
        """One replica: an ``HFEngine`` and a batching queue in front of it."""

        def __init__(self, model_path: str, served_name: str, dtype: str, threads: int, defaults: dict):
            from slim_ray.generate.engines import HFEngine

            self.engine = HFEngine(model_path, sampling=dict(defaults), dtype=dtype, threads=threads)
            self.name = served_name
            self.defaults = defaults
            self.created = int(time.time())

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def generate(self, requests: list[tuple[list[dict], tuple]]) -> list[Any]:
            """Requests with equal sampling settings share one ``generate`` call."""
            groups: dict[tuple, list[int]] = {}
            for i, (_, sampling) in enumerate(requests):
                groups.setdefault(sampling, []).append(i)
            results: list[Any] = [None] * len(requests)
            loop = asyncio.get_running_loop()
            for sampling, idx in groups.items():
                s = dict(sampling)
                msgs = [requests[i][0] for i in idx]
                try:
                    out = await loop.run_in_executor(None, self.engine.generate, msgs, s)
                except Exception as e:  # noqa: BLE001 -- reported per request
                    out = [e] * len(idx)
                for i, r in zip(idx, out):
                    results[i] = r
            return results

        async def __call__(self, request):
            path = request.url.path.rstrip("/")
            if request.method == "GET" and path.endswith("/v1/models"):
                return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                    "owned_by": "slim_ray"}]}
            if request.method != "POST" or not path.endswith("/v1/chat/completions"):
                return _error(404, f"no route {request.method} {path}; use POST /v1/chat/completions", "not_found")
            try:
                body = await request.json()
            except Exception:
                return _error(400, "request body is not JSON")
            parsed = _parse_chat_request(body, self.name, self.defaults)
            if not isinstance(parsed, tuple):
                return parsed  # an error response
            msgs, sampling = parsed
            res = await self.generate((msgs, sampling))
            if isinstance(res, Exception):
                return _error(500, f"generation failed: {type(res).__name__}: {res}", "server_error")
            text, n_in, n_out = res
            finish = "length" if n_out >= dict(sampling)["max_new_tokens"] else "stop"
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            }

    return ChatLLM


def start(model: str, *, served_name: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          replicas: int = 1, cpus_per_replica: float = 1.0, max_batch_size: int = 8, batch_wait_ms: float = 50,
          dtype: str = "auto", defaults: Optional[dict] = None, cache_dir: Optional[str] = None) -> str:
    """Deploy the endpoint on the current Ray (call ``init_ray`` first). Returns its base URL."""
    from ray import serve

    from slim_ray.assets import resolve_llm

    path = resolve_llm(model, cache=cache_dir)
    sampling = {"max_new_tokens": 256, "min_new_tokens": 0, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
    sampling.update(defaults or {})
    serve.start(http_options={"host": host, "port": port})
    dep = make_deployment(cpus_per_replica, replicas, max_batch_size, batch_wait_ms / 1000.0)
    app = dep.bind(path, served_name or model, dtype, max(1, int(cpus_per_replica)), sampling)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/v1"


def stop() -> None:
    from ray import serve

    try:
        serve.delete(APP_NAME)
    except Exception:  # already gone
        pass


def serve_until_stopped(cfg, model: Optional[str] = None, name: Optional[str] = None, host: str = "127.0.0.1",
                        port: int = 8000, replicas: int = 1, cpus_per_replica: float = 1.0,
                        max_batch_size: int = 8, batch_wait_ms: float = 50.0, dtype: str = "auto",
                        max_tokens: int = 256) -> int:
    """``slim-ray serve-llm`` (its arguments are parsed in ``slim_ray.cli``): start the endpoint,
    print its URL as JSON, serve until SIGINT/SIGTERM."""
    from slim_ray.runtime import init_ray

    model = model or cfg.teacher.model
    init_ray(cfg.ray)
    try:
        url = start(model, served_name=name, host=host, port=port, replicas=replicas,
                    cpus_per_replica=cpus_per_replica, max_batch_size=max_batch_size,
                    batch_wait_ms=batch_wait_ms, dtype=dtype,
                    defaults={"max_new_tokens": max_tokens}, cache_dir=cfg.cache_dir)
    except Exception as e:  # the one line a person needs; the endpoint never started
        print(f"slim-ray serve-llm: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"url": url, "model": name or model}), flush=True)
    stop_event = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_event.set())
    stop_event.wait()
    stop()
    return 0
