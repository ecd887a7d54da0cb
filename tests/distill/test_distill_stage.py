"""``slim-ray distill`` end to end on 2 Ray Train workers (DeepSpeed ZeRO-2, LoRA, real SmolLM2):
held-out loss falls, the export loads (adapter via PEFT, merged via transformers and the
generation stage's resolver + hf engine) and reproduces the trained loss, the manifest is right.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import pytest
from distill_fixtures import write_run

from slim_ray.config import load_config


def _loss(model, examples, pad_id):
    import torch

    from slim_ray.distill.dataset import IGNORE_INDEX, collate

    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            b = collate([e], pad_id)
            n = float((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def test_distill_stage_end_to_end(ray_session, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slim_ray.assets import hash_folder, resolve_llm
    from slim_ray.distill.dataset import load_dataset
    from slim_ray.lineage import read_manifest
    from slim_ray.stages import run_stage

    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"distill.run_name=e2e-{uuid.uuid4().hex[:8]}", "distill.max_length=256",
        "distill.max_steps=6", "distill.checkpoint_every=3", "distill.batch_size=2", "distill.lr=1e-3",
        "distill.num_samples=1", "distill.sample_max_new_tokens=24",
    ])
    t0 = time.time()
    res = run_stage("distill", cfg)
    print(f"distill stage took {time.time() - t0:.1f}s:", {k: v for k, v in res["summary"].items() if k.endswith("_s")})
    s = res["summary"]
    lay = cfg.layout

    # training: LoRA r16 on q,k,v,o of SmolLM2-135M = 30 layers * 16 * (1152+768+768+1152)
    assert s["trainable_params"] == 30 * 16 * 3840 == 1_843_200
    assert s["steps"] == 6 and s["data"]["train"] == 13 and s["data"]["eval"] == 2
    assert s["data"]["skipped_error"] == 1
    assert s["eval_loss_after"] < 0.8 * s["eval_loss_before"], s
    assert math.isclose(s["eval_ppl_after"], math.exp(s["eval_loss_after"]))
    log = os.path.join(os.path.abspath(lay.distill), "logs", f"{s['run_name']}.jsonl")
    with open(log) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3, 4, 5, 6]

    # export: the merged folder and base+adapter score the held-out pairs like the trained model
    base_path = resolve_llm("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(lay.student_merged)
    data = load_dataset(cfg, tok, base_path)
    merged = AutoModelForCausalLM.from_pretrained(lay.student_merged, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    l_base = _loss(base, data.eval, tok.pad_token_id)
    l_merged = _loss(merged, data.eval, tok.pad_token_id)
    peft = PeftModel.from_pretrained(base, lay.student_adapter).eval()
    l_adapter = _loss(peft, data.eval, tok.pad_token_id)
    assert abs(l_base - s["eval_loss_before"]) < 0.1, (l_base, s)
    assert abs(l_merged - s["eval_loss_after"]) < 0.1, (l_merged, s)
    assert abs(l_adapter - l_merged) < 0.05
    with open(os.path.join(lay.student_adapter, "adapter_config.json")) as f:
        acfg = json.load(f)
    assert acfg["r"] == 16 and acfg["base_model_name_or_path"] == base_path

    # the generation stage resolves student.model=distilled to the merged folder (hf engine)
    gen = pytest.importorskip("slim_ray.generate.stage")
    spec = gen.resolve_model(cfg, cfg.student)
    assert os.path.samefile(spec.path, lay.student_merged)
    with open(os.path.join(lay.distill, "samples.jsonl")) as f:
        samples = [json.loads(x) for x in f]
    assert len(samples) == 1 and samples[0]["student"] and samples[0]["teacher"].startswith("Step 1")
    assert samples[0]["user_id"] in {e.user_id for e in data.eval}

    # manifest: hashes of what was used and made; rerun is skipped as fresh
    m = s["manifest"]
    assert m["adapter_hash"] == hash_folder(lay.student_adapter)
    assert m["merged_hash"] == hash_folder(lay.student_merged)
    assert m["base_model_hash"] == hash_folder(base_path) and m["data_hash"] == data.data_hash
    assert m["eval_loss"] == s["eval_loss_after"] and m["prompt_version"] == data.prompt_version
    assert read_manifest(lay.distill)["status"] == "complete"
    assert run_stage("distill", cfg)["skipped"]
