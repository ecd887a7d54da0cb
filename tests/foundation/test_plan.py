"""`slim-ray run --dry-run`: configs/paper.yaml resolves and checks out without GPUs, weights or Ray."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import sys; from slim_ray.cli import main; rc = main(sys.argv[1:]); "
         "print('LOADED', sorted(m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules)); "
         "sys.exit(rc)")


def _dry_run(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, "run", "--config", "configs/paper.yaml", "--dry-run",
                           *(["--set", *overrides] if overrides else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_paper_config_dry_run_prints_the_plan_and_loads_nothing():
    out = _dry_run()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run folder s3://slim-runs/games (s3 storage)" in out.stdout
    assert "distill   -> s3://slim-runs/games/distill" in out.stdout
    assert "deepspeed ZeRO-3; 8 Ray Train workers on GPU" in out.stdout
    assert "engine=vllm model=distilled (all users); 8 replicas x (1.0 CPU, 1.0 GPU)" in out.stdout
    assert "all checks passed" in out.stdout and "LOADED []" in out.stdout
    assert out.stderr.strip() == ""


def test_dry_run_refuses_a_base_student_and_a_7b_model_without_zero3():
    out = _dry_run("distill.base_model=/mnt/shared/models/Llama-2-7b-hf", "distill.method=full",
                   "distill.zero_stage=2", "student.gpus_per_worker=0")
    assert out.returncode == 2, out.stdout + out.stderr
    problems = [ln for ln in out.stderr.splitlines() if ln.startswith("problem: ")]
    assert len(problems) == 3, problems
    assert "not a chat/instruct model" in problems[0] and "Llama-2-7b-chat-hf" in problems[0]
    assert "full fine-tune of a 7B model needs strategy=deepspeed with zero_stage=3" in problems[1]
    assert "student.engine=vllm on a cluster needs student.gpus_per_worker > 0" in problems[2]
    assert "3 problem(s)" in out.stdout
