"""What the fault tests (tests/test_faults.py) and the fault campaign (bench/faults.py) share.

- ``StandIn``: a deterministic OpenAI-compatible server on 127.0.0.1 (``/v1/models``,
  ``/v1/chat/completions``). Its answer is a function of the request's messages only, so two runs of
  the same config write the same rationales, and a faulted run can be compared with a clean one.
  ``delay_s`` makes each request take a while, so a stage lasts long enough to be hit mid-way.
- ``slim_ray_command`` / ``start_slim_ray``: the real ``slim-ray`` console script in a subprocess.
- ``process_tree`` / ``kill_pids``: a process and its descendants (the local Ray it started), by
  PID and start time, so a recycled PID is never signalled.
- ``contract_digest``: an order-independent content hash of a Parquet folder (sorted canonical
  rows), with row, duplicate and lost-key counts against a reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Optional

import pyarrow.parquet as pq

from slim_ray.scale.standin import free_port  # noqa: F401  (the tests' name for it)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- the stand-in server


def stand_in_answer(messages: list) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens): a pure function of the messages."""
    h = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    text = (f"Step 1: the user likes pattern {h[:6]}. Step 2: genres {h[6:10]} and {h[10:14]}. "
            f"Step 3: Movie {h[14:18]}, Movie {h[18:22]}.")
    return text, sum(len(m.get("content") or "") for m in messages) // 4, 24


class StandIn:
    """OpenAI-compatible stand-in on 127.0.0.1:``port`` (0: any free port), served from a thread of
    this process. ``delay_s``: seconds each completion takes. ``fail``: answer every completion with
    this HTTP status instead (e.g. 503), to play an endpoint that went down."""

    def __init__(self, port: int = 0, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.fail: Optional[int] = None
        self.lock = threading.Lock()
        self.completions = 0  # successful answers
        self.prompts: dict[str, int] = {}  # prompt hash -> successful answers (duplicates show)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client went away (a kill)
                    pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "stand-in"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.delay_s:
                    time.sleep(server.delay_s)
                if server.fail:
                    return self._send(server.fail, b'{"error": {"message": "stand-in is down"}}')
                msgs = body["messages"]
                text, p, c = stand_in_answer(msgs)
                key = hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest()
                with server.lock:
                    server.completions += 1
                    server.prompts[key] = server.prompts.get(key, 0) + 1
                answer = {"object": "chat.completion", "model": body.get("model"),
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": text}}],
                          "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}
                self._send(200, json.dumps(answer).encode())

        class Server(ThreadingHTTPServer):
            request_queue_size = 128
            allow_reuse_address = True

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the real command


def slim_ray_exe() -> str:
    """The installed ``slim-ray`` console script of this interpreter's environment."""
    exe = os.path.join(os.path.dirname(sys.executable), "slim-ray")
    if not os.path.exists(exe):
        raise FileNotFoundError(f"{exe}: install the package (pip install -e .) to get the slim-ray command")
    return exe


def command_env(extra: Optional[dict] = None) -> dict[str, str]:
    """The environment of a user's shell: no test-only Ray settings, offline Hugging Face."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTEST", "AWS_")) and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def start_slim_ray(args: list[str], log_path: str, env: Optional[dict] = None) -> subprocess.Popen:
    """``slim-ray <args>`` in the background, its stdout+stderr appended to ``log_path``."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([slim_ray_exe(), *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=command_env(env))
    finally:
        log.close()


@dataclass
class Finished:
    rc: int
    seconds: float
    output: str  # what this invocation printed (stdout + stderr)


# Ray 2.60 gives a new local node 30 s (hard-coded in ray/_private/node.py) to register; on an
# overloaded machine it can miss that, before any of our code has run.
RAY_STARTUP_TIMEOUT = "The current node timed out during startup"


def ray_startup_timed_out(output: str) -> bool:
    return RAY_STARTUP_TIMEOUT in output


def run_slim_ray(args: list[str], log_path: str, timeout_s: float, env: Optional[dict] = None,
                 startup_retries: int = 2) -> Finished:
    """Run ``slim-ray <args>`` to the end (its whole process tree is killed past ``timeout_s``).
    A run whose local Ray did not come up in time (``RAY_STARTUP_TIMEOUT``) is started again, up to
    ``startup_retries`` times: that is the machine's load, not the behaviour under test."""
    for _ in range(startup_retries):
        res = _run_once(args, log_path, timeout_s, env)
        if res.rc == 0 or not ray_startup_timed_out(res.output):
            return res
    return _run_once(args, log_path, timeout_s, env)


def _run_once(args: list[str], log_path: str, timeout_s: float, env: Optional[dict]) -> Finished:
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    t0 = time.time()
    proc = start_slim_ray(args, log_path, env)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_pids(process_tree(proc.pid), signal.SIGKILL)
        proc.wait()
        rc = -9
    reap(proc)
    with open(log_path, "rb") as f:
        f.seek(start)
        out = f.read().decode(errors="replace")
    return Finished(rc, time.time() - t0, out)


# --------------------------------------------------------------------------- processes by PID


def _stat(pid: int) -> Optional[tuple[int, int]]:
    """(ppid, start time in clock ticks) of a live process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[1]), int(rest[19])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int) -> list[tuple[int, int]]:
    """``root`` and all its live descendants as (pid, start time), parents first."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    if root not in starts:
        return []
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append((pid, starts[pid]))
        todo.extend(children.get(pid, []))
    return out


def kill_pids(procs: Iterable[tuple[int, int]], sig: int = signal.SIGKILL) -> int:
    """Signal each (pid, start time) that is still that same process. Returns how many."""
    n = 0
    for pid, start in procs:
        st = _stat(pid)
        if st and st[1] == start:
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
    return n


def reap(proc: subprocess.Popen, tree: Optional[list[tuple[int, int]]] = None, grace_s: float = 10.0) -> None:
    """After the command ended: whatever of its process tree is left (a local Ray whose driver was
    killed) gets SIGTERM, then SIGKILL, by PID."""
    left = [p for p in (tree or []) if p[0] != proc.pid]
    for pid, start in process_tree(proc.pid) if proc.poll() is None else []:
        left.append((pid, start))
    # descendants re-parented to init after the driver died are still in ``tree``
    if kill_pids(left, signal.SIGTERM):
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_stat(p) and _stat(p)[1] == s for p, s in left):
            time.sleep(0.2)
        kill_pids(left, signal.SIGKILL)


def find_in_tree(root: int, needle: str) -> list[tuple[int, int]]:
    """Processes of ``root``'s tree whose command line contains ``needle`` (e.g. a Ray actor's
    process title ``ray::MapWorker(...)``)."""
    return [(p, s) for p, s in process_tree(root) if needle in cmdline(p)]


def wait_for(pred, timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(every_s)
    return False


# --------------------------------------------------------------------------- content hashes


@dataclass
class Digest:
    """An order-independent summary of a Parquet folder's rows."""

    digest: str
    rows: int
    keys: set = field(default_factory=set)
    duplicates: int = 0
    unreadable: list = field(default_factory=list)

    def compare(self, clean: "Digest") -> dict:
        """Rows lost (keys of the clean run missing here), duplicates, identical content."""
        return {"rows": self.rows, "lost": len(clean.keys - self.keys), "duplicates": self.duplicates,
                "identical": self.digest == clean.digest and not self.unreadable}


def parquet_parts(folder: str) -> list[str]:
    """The published Parquet files of a folder (hidden temp files are not data)."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.join(root, n) for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]
    return sorted(out)


# Columns that differ between two runs of the same config by design: the Ray node that wrote a row.
RUN_SPECIFIC = ("node_id",)


def contract_digest(folder: str, key: tuple[str, ...], exclude: tuple[str, ...] = RUN_SPECIFIC) -> Digest:
    """sha256 of the sorted canonical JSON rows of every part of ``folder``, without the columns in
    ``exclude`` (ones that legitimately differ between runs, e.g. the node, timings). ``key``: the
    columns that identify a row, for the duplicate and lost counts."""
    rows, unreadable = [], []
    for f in parquet_parts(folder):
        try:
            t = pq.read_table(f)
        except Exception as e:  # a corrupt part is reported, not hashed
            unreadable.append(f"{os.path.relpath(f, folder)}: {type(e).__name__}")
            continue
        t = t.select([c for c in t.column_names if c not in exclude])
        rows += [json.dumps(r, sort_keys=True, default=str) for r in t.to_pylist()]
    keys = [tuple(json.loads(r)[k] for k in key) for r in rows]
    h = hashlib.sha256()
    for r in sorted(rows):
        h.update(r.encode())
        h.update(b"\n")
    return Digest(h.hexdigest(), len(rows), set(keys), len(keys) - len(set(keys)), unreadable)


def manifest(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def corrupt_file(path: str, how: str = "garbage") -> None:
    """Damage a file in place: ``garbage`` overwrites its middle with junk (same size), ``truncate``
    cuts it in half."""
    size = os.path.getsize(path)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        return
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(b"\xde\xad\xbe\xef" * max(1, size // 12))
