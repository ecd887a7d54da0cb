"""An OpenAI-compatible stand-in LLM endpoint for scale measurements.

Generating a million real rationales needs a GPU fleet; what is ours to make fast at that size is
the orchestration around the LLM (prompt building, dispatch, retries, writing parts, resume). This
server speaks the real protocol (``GET /v1/models``, ``POST /v1/chat/completions``) on 127.0.0.1
and answers every request after ``latency_ms`` with a deterministic three-step rationale of
``words`` words, a pure function of the request's messages: two runs write the same rows, and a
rerun after a crash can be checked row for row. Every figure measured through it says so.

    python -m slim_ray.scale.standin --port 0 --latency-ms 20 --words 48 --ready-file /tmp/standin.json

``GET /stats`` returns how many completions it served and how many distinct prompts it saw
(a prompt answered twice shows up as ``completions > distinct_prompts``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
from typing import Any

import numpy as np

VOCAB = ("likes", "drama", "comedy", "recent", "classic", "action", "quiet", "bright", "series", "sequel",
         "genre", "mood", "family", "story", "fast", "slow", "visual", "music", "award", "cult")


def stand_in_answer(messages: list, words: int = 48) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) for ``messages``: a three-step answer of ``words``
    words (a third per step), the same every time for the same messages."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    picks = [VOCAB[i] for i in rng.integers(0, len(VOCAB), size=max(3, words))]
    third = len(picks) // 3
    steps = [" ".join(picks[:third]), " ".join(picks[third:2 * third]), " ".join(picks[2 * third:])]
    text = f"Step 1: {steps[0]}. Step 2: {steps[1]}. Step 3: {steps[2]}."
    prompt_tokens = sum(len(m.get("content") or "") for m in messages) // 4
    return text, prompt_tokens, len(picks) + 6


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (closed again before returning)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _State:
    def __init__(self, latency_s: float, words: int):
        self.latency_s, self.words = latency_s, words
        self.completions = 0
        self.prompts: set[bytes] = set()


def make_app(latency_ms: float = 0.0, words: int = 48):
    """The ASGI app (uvicorn runs it)."""
    state = _State(latency_ms / 1000.0, words)

    async def send_json(send, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"].rstrip("/"), scope["method"]
        if method == "GET" and path == "/v1/models":
            return await send_json(send, 200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})
        if method == "GET" and path == "/stats":
            return await send_json(send, 200, {"completions": state.completions,
                                               "distinct_prompts": len(state.prompts)})
        if method != "POST" or path != "/v1/chat/completions":
            return await send_json(send, 404, {"error": {"message": f"no route {method} {path}"}})
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        try:
            req = json.loads(b"".join(chunks))
            messages = req["messages"]
        except (ValueError, KeyError, TypeError) as e:
            return await send_json(send, 400, {"error": {"message": f"bad request: {e}"}})
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        text, p, c = stand_in_answer(messages, state.words)
        state.completions += 1
        state.prompts.add(hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=8).digest())
        await send_json(send, 200, {
            "id": "standin", "object": "chat.completion", "model": req.get("model", "stand-in"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        })

    return app


def main(argv=None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (written to --ready-file)")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--words", type=int, default=48)
    ap.add_argument("--ready-file", help="JSON {url, port, pid} written once the server listens")
    a = ap.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(a.latency_ms, a.words), log_level="warning", access_log=False,
                            lifespan="on", backlog=2048, timeout_keep_alive=30)
    server = uvicorn.Server(config)

    async def run():
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.05)
        if a.ready_file:
            tmp = a.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"url": f"http://{a.host}:{port}/v1", "port": port, "pid": os.getpid()}, f)
            os.replace(tmp, a.ready_file)
        await serving

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
