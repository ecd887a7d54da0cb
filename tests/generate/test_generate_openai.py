"""The openai engine (ray.data.llm HttpRequestProcessorConfig) against our own `slim-ray serve-llm`
endpoint on Ray Serve (SmolLM2-135M behind /v1/chat/completions, loopback)."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import pytest

from gen_data import write_prepared
from slim_ray.config import load_config
from slim_ray.data.io import read_rationales
from slim_ray.generate import serve_llm
from slim_ray.generate.engines import EngineError
from slim_ray.generate.stage import run_teach
from slim_ray.generate.store import part_files

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unreachable_endpoint_fails_before_any_work(tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=4)
    port = _free_port()  # nothing listens there
    cfg = load_config(None, [f"run_dir={run}", "teacher.engine=openai", f"teacher.model={MODEL}",
                             f"teacher.base_url=http://127.0.0.1:{port}/v1"])
    with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port}/v1 is unreachable"):
        run_teach(cfg)
    assert not part_files(cfg.layout.rationales("teacher"))


def test_openai_engine_against_serve_llm(ray_session, tmp_path):
    port = _free_port()
    url = serve_llm.start(MODEL, port=port, max_batch_size=4, defaults={"max_new_tokens": 16})
    try:
        assert url == f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == [MODEL]
        status, body = _post(url + "/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Name one movie."}],
            "max_tokens": 8, "temperature": 0,
        })
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 5
        status, body = _post(url + "/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
        assert status == 404 and "not served" in body["error"]["message"]
        status, body = _post(url + "/chat/completions", {"model": MODEL, "messages": "hi"})
        assert status == 400 and "messages" in body["error"]["message"]

        run = str(tmp_path / "run")
        write_prepared(run, n_users=5)
        calls = str(tmp_path / "calls.txt")
        cfg = load_config(None, [
            f"run_dir={run}", "teacher.engine=openai", f"teacher.model={MODEL}", f"teacher.base_url={url}",
            "teacher.num_users=null", "teacher.max_new_tokens=12", "teacher.batch_size=5", "teacher.qps=20",
            f"teacher.call_log={calls}", "teacher.openai_extra_body={repetition_penalty: 1.1}",
        ])
        s = run_teach(cfg)
        t = read_rationales(cfg.layout.rationales("teacher"))
        assert sorted(t["user_id"].to_pylist()) == [1, 2, 3, 4, 5]
        assert s["generated_rows"] == 5 and s["failed_rows_this_run"] == 0
        assert all(r["error"] is None and r["text"] and 1 <= r["n_output_tokens"] <= 12 and r["n_prompt_tokens"] > 100
                   for r in t.to_pylist())
        assert set(t["engine"].to_pylist()) == {"openai"}
        # the same prompts, model id, version and sampling as the hf engine: same keys
        assert t["model"][0].as_py() == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert len(open(calls).read().splitlines()) == 5
        assert run_teach(cfg)["generated_rows"] == 0  # resumes: nothing left to do
    finally:
        serve_llm.stop()


def test_serve_llm_cli_parses_its_flags(capsys):
    from slim_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve-llm", "--help"])
    assert e.value.code == 0 and "--max-batch-size" in capsys.readouterr().out
    assert main(["serve-llm", "--set", "teacher.no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
