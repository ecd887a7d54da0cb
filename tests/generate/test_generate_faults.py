"""The openai engine against a faulty OpenAI-compatible server on loopback.

The server answers ``/v1/chat/completions`` itself (no model) and injects faults on a fixed,
deterministic share of the prompts (by a hash of the request's messages):

- bucket 0 (about 10 %): every attempt fails, cycling through 500, 429 with ``Retry-After``, a
  timeout (the server sleeps past the client's timeout) and malformed JSON -> the row exhausts its
  retries and must be recorded as failed, without failing the stage;
- buckets 1-4: the first attempt fails with 429 + ``Retry-After: 1``, 500, a timeout, or malformed
  JSON; the retry succeeds;
- the rest: answered at once.

First run: every wanted row is done or failed. Rerun with injection off: exactly the failed rows
are requested again; the output has one row per user, no duplicate key, and the running token
totals count each successful row once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa

from gen_data import items_table
from slim_ray.config import load_config
from slim_ray.data.io import read_rationales, write_table
from slim_ray.data.schemas import SEQUENCES_SCHEMA
from slim_ray.generate.stage import run_teach

N_USERS = 40
TIMEOUT_S = 1.5  # the client's request timeout; an injected timeout sleeps 2x this


def _sequences() -> pa.Table:
    """40 users with distinct 3-item training prefixes (so every prompt is distinct)."""
    triples = list(itertools.permutations(range(1, 13), 3))
    rows = []
    for u in range(1, N_USERS + 1):
        ids = list(triples[u * 29 % len(triples)]) + [(u % 12) + 1, ((u + 5) % 12) + 1]
        rows.append({"user_id": u, "user_key": f"u{u}", "item_ids": ids, "timestamps": [10 * k for k in range(5)]})
    return pa.Table.from_pylist(rows, schema=SEQUENCES_SCHEMA)


def bucket(messages: list) -> int:
    return int(hashlib.sha256(json.dumps(messages).encode()).hexdigest(), 16) % 10


def usage(messages: list) -> tuple[int, int]:
    """The fake token counts of a prompt: (prompt tokens, completion tokens)."""
    return sum(len(m["content"]) for m in messages) // 4, 7


class FaultyServer:
    def __init__(self):
        self.inject = True
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()  # prompt hash -> requests received
        self.log: list[tuple[str, int, str, float]] = []  # (prompt hash, bucket, outcome, time)
        self.billed: dict[str, int] = {}  # prompt hash -> prompt tokens of its successful answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes, headers: dict | None = None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout case)
                    pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-teacher"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                msgs = body["messages"]
                key = hashlib.sha256(json.dumps(msgs).encode()).hexdigest()
                b = bucket(msgs)
                with server.lock:
                    n = server.attempts[key]
                    server.attempts[key] += 1
                    inject = server.inject
                fault = None
                if inject and b == 0:
                    fault = ("500", "429", "timeout", "malformed")[n % 4]
                elif inject and 1 <= b <= 4 and n == 0:
                    fault = ("429", "500", "timeout", "malformed")[b - 1]
                with server.lock:
                    server.log.append((key, b, fault or "ok", time.monotonic()))
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"})
                if fault == "500":
                    return self._send(500, b"Internal Server Error")
                if fault == "timeout":
                    time.sleep(2 * TIMEOUT_S)
                    return self._send(200, b'{"choices": []}')
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": {"content": "Step 1')
                p, c = usage(msgs)
                with server.lock:
                    assert key not in server.billed, "a prompt was answered twice"
                    server.billed[key] = p
                answer = {"object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content":
                                       "Step 1: likes action. Step 2: likes drama. Step 3: Heat."}}],
                          "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}
                self._send(200, json.dumps(answer).encode())

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # every replica's concurrent connections are accepted at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_faulty_endpoint_rows_fail_alone_and_rerun_fills_them(ray_session, tmp_path):
    run = str(tmp_path / "run")
    write_table(items_table(), os.path.join(run, "prepared", "items", "part-0.parquet"))
    write_table(_sequences(), os.path.join(run, "prepared", "sequences", "part-0.parquet"))
    srv = FaultyServer()
    try:
        cfg = load_config(None, [
            f"run_dir={run}", "teacher.engine=openai", "teacher.model=fake-teacher", f"teacher.base_url={srv.url}",
            "teacher.num_users=null", "teacher.rationale_cut=full_prefix", "teacher.batch_size=10",
            "teacher.num_workers=2", "teacher.max_concurrent_requests=10", "teacher.max_retries=3",
            f"teacher.request_timeout_s={TIMEOUT_S}", "teacher.retry_base_s=0.05", "teacher.retry_max_wait_s=2",
        ])
        out = cfg.layout.rationales("teacher")
        t0 = time.time()
        s1 = run_teach(cfg)
        first_log = list(srv.log)
        buckets = {k: b for k, b, _, _ in first_log}
        n_always = sum(1 for b in buckets.values() if b == 0)
        per_bucket = Counter(buckets.values())
        retried = len(first_log) - len(buckets)
        counts1 = (f"run 1: done={s1['done_rows']} failed={s1['failed_rows']} missing={s1['missing_rows']} "
                   f"requests={len(first_log)} retried={retried} buckets={dict(sorted(per_bucket.items()))}")
        print(counts1)
        # every fault kind was exercised, on a fixed share of the prompts
        assert all(per_bucket[b] >= 1 for b in range(5)), counts1
        outcomes = Counter(o for _, _, o, _ in first_log)
        assert all(outcomes[o] >= 1 for o in ("429", "500", "timeout", "malformed")), f"{counts1} {outcomes}"
        # the stage finished; each wanted row is done or recorded failed
        assert len(buckets) == N_USERS and s1["wanted_rows"] == N_USERS, counts1
        assert s1["done_rows"] + s1["failed_rows"] == N_USERS and s1["missing_rows"] == 0, counts1
        assert s1["failed_rows"] == n_always >= 1, counts1
        t1 = read_rationales(out)
        failed = t1.filter(t1["error"].is_valid())
        assert failed.num_rows == n_always, counts1
        assert all("gave up after 4 attempts" in e for e in failed["error"].to_pylist()), failed["error"].to_pylist()
        # an always-failing prompt was tried 1 + max_retries = 4 times by the client (its error says
        # so); the server saw them all unless a connection timed out before it was accepted, which
        # a loaded machine can cause. A flaky prompt: its injected failure, then a success.
        tries = Counter(k for k, _, _, _ in first_log)
        assert {tries[k] for k, b in buckets.items() if b == 0} <= {3, 4}, f"{counts1} {tries}"
        assert all(tries[k] >= 2 for k, b in buckets.items() if 1 <= b <= 4), f"{counts1} {tries}"
        # Retry-After: 1 was honoured (the next attempt of that prompt came at least ~1 s later)
        times = defaultdict(list)
        for k, _, o, ts in first_log:
            times[k].append((ts, o))
        gaps = [b[0] - a[0] for v in times.values() for a, b in zip(v, v[1:]) if a[1] == "429"]
        assert gaps and min(gaps) >= 0.9, gaps

        srv.inject = False
        s2 = run_teach(cfg)
        second_log = srv.log[len(first_log):]
        t2 = read_rationales(out)
        pairs = list(zip(t2["user_id"].to_pylist(), t2["rationale_key"].to_pylist()))
        dup = len(pairs) - len(set(pairs))
        counts2 = (f"run 2: done={s2['done_rows']} failed={s2['failed_rows']} generated={s2['generated_rows']} "
                   f"skipped_done={s2['skipped_already_done']} requests={len(second_log)} duplicates={dup}")
        print(counts2)
        # exactly the failed rows were requested again, once each
        assert sorted(k for k, _, _, _ in second_log) == sorted(k for k, b in buckets.items() if b == 0), counts2
        assert s2["generated_rows"] == n_always and s2["skipped_already_done"] == N_USERS - n_always, counts2
        assert (s2["done_rows"], s2["failed_rows"], s2["missing_rows"]) == (N_USERS, 0, 0), counts2
        assert sorted(t2["user_id"].to_pylist()) == list(range(1, N_USERS + 1)) and dup == 0, counts2
        assert len(set(t2["rationale_key"].to_pylist())) == N_USERS, counts2
        assert t2.filter(t2["error"].is_valid()).num_rows == 0, counts2
        # tokens: each successful row once (what the server billed for the answered requests)
        rows = t2.to_pylist()
        assert all(r["n_output_tokens"] == 7 and r["n_prompt_tokens"] > 50 for r in rows), counts2
        total_in = sum(r["n_prompt_tokens"] for r in rows)
        assert s2["prompt_tokens_total"] == total_in and s2["output_tokens_total"] == 7 * N_USERS, counts2
        assert s2["prompt_tokens_total"] == s1["prompt_tokens_total"] + s2["prompt_tokens"], counts2
        # ... and what the server answered: one success per prompt, whose usage the rows carry
        assert sorted(srv.billed) == sorted(buckets) and total_in == sum(srv.billed.values()), counts2

        s3 = run_teach(cfg)  # nothing left: no request, the totals stay
        assert s3["generated_rows"] == 0 and len(srv.log) == len(first_log) + len(second_log)
        assert (s3["prompt_tokens_total"], s3["output_tokens_total"]) == (total_in, 7 * N_USERS)
        assert time.time() - t0 < 90
    finally:
        srv.close()
