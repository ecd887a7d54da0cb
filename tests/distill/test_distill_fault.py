"""``slim-ray distill`` end to end on 2 Ray Train workers (DeepSpeed ZeRO-3, LoRA, real SmolLM2),
with a fault: one training worker is SIGKILLed mid-run. The run restores from the latest
checkpoint and finishes; no step done before that checkpoint is trained again; the redone step
sees the same batch and reproduces its loss (model, optimizer, scheduler and RNG restored).
Then the export: held-out loss fell, the adapter (PEFT) and the merged folder (transformers, and
the generation stage's resolver + hf engine) reproduce the trained loss, the manifest is right.

One Ray Train run covers both, to keep the suite short. ZeRO-3 on purpose: parameters and
optimizer state are partitioned across ranks, the hardest case for restore and export.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid

from distill_fixtures import write_run

from slim_ray.config import load_config

TOTAL, EVERY = 6, 2


def _read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def _published_hash(folder: str, tmp_path) -> str:
    """hash_folder of a published export without the content index the storage layer adds."""
    import shutil

    from slim_ray import storage
    from slim_ray.assets import hash_folder

    index = storage.read_json(os.path.join(folder, storage.CONTENT_INDEX))
    files = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
    assert sorted(index) == [f for f in files if f != storage.CONTENT_INDEX]  # every file indexed
    dst = tmp_path / f"published-{os.path.basename(folder)}"
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns(storage.CONTENT_INDEX))
    return hash_folder(dst)


def test_distill_survives_worker_kill_and_exports(ray_session, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ray

    from slim_ray.assets import hash_folder, resolve_llm
    from slim_ray.distill.dataset import load_dataset
    from slim_ray.generate.models import resolve_model
    from slim_ray.lineage import read_manifest
    from slim_ray.stages import run_stage

    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    name = f"kill-{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"distill.run_name={name}", "distill.max_length=256",
        f"distill.max_steps={TOTAL}", f"distill.checkpoint_every={EVERY}", "distill.batch_size=2",
        "distill.lr=1e-3", "distill.zero_stage=3", "distill.max_failures=2",
        "distill.num_samples=1", "distill.sample_max_new_tokens=24",
    ])
    lay = cfg.layout
    log = os.path.join(os.path.abspath(lay.distill), "logs", f"{name}.jsonl")
    killed: dict = {}

    def killer():
        # Rank 0 logs every finished step with its pid; kill it one step after the first checkpoint.
        deadline = time.time() + 900
        while time.time() < deadline:
            recs = _read_log(log)
            if recs and recs[-1]["step"] >= EVERY + 1:
                killed.update(pid=recs[-1]["pid"], after_step=recs[-1]["step"])
                os.kill(recs[-1]["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.time()
    s = run_stage("distill", cfg)["summary"]
    t.join(timeout=5)
    print(f"distill with a worker kill took {time.time() - t0:.1f}s, killed {killed}")
    assert killed, "the killer never saw a step past the first checkpoint"

    # ---- the fault: restored from the last checkpoint, nothing before it trained twice
    recs = _read_log(log)
    first = [r for r in recs if r["pid"] == killed["pid"]]
    second = [r for r in recs if r["pid"] != killed["pid"]]
    assert first and second, recs
    resumed_at = second[0]["step"] - 1  # the checkpoint the restored run started from
    assert resumed_at % EVERY == 0 and EVERY <= resumed_at <= killed["after_step"]
    steps = [r["step"] for r in recs]
    for k in range(1, resumed_at + 1):
        assert steps.count(k) == 1, steps
    assert [r["step"] for r in second] == list(range(resumed_at + 1, TOTAL + 1))
    redo = {r["step"]: r for r in first if r["step"] > resumed_at}
    assert redo, "the kill landed exactly on a checkpoint; nothing was redone"
    for r in second:
        if r["step"] in redo:
            assert r["samples"] == redo[r["step"]]["samples"]  # data position
            assert abs(r["lr"] - redo[r["step"]]["lr"]) < 1e-12  # scheduler
            assert abs(r["loss"] - redo[r["step"]]["loss"]) < 2e-3, (r, redo[r["step"]])  # weights+RNG

    # ---- training: LoRA r16 on q,k,v,o of SmolLM2-135M = 30 layers * 16 * (1152+768+768+1152)
    assert s["trainable_params"] == 30 * 16 * 3840 == 1_843_200
    assert s["steps"] == TOTAL and s["data"]["train"] == 13 and s["data"]["eval"] == 2
    assert s["data"]["skipped_error"] == 1
    assert s["eval_loss_after"] < 0.8 * s["eval_loss_before"], s
    assert math.isclose(s["eval_ppl_after"], math.exp(s["eval_loss_after"]))
    # where it ran: the data task and both Train workers, all on this one local node
    assert s["node_ids"] == [ray.get_runtime_context().get_node_id()]
    assert s["storage_path"] == os.path.join(lay.distill, "ray")

    # ---- export: merged folder and base+adapter score the held-out pairs like the trained model
    base_path = resolve_llm("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(base_path)
    data = load_dataset(cfg, tok, base_path)
    merged = AutoModelForCausalLM.from_pretrained(lay.student_merged, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    l_base = _loss(base, data.eval, tok.pad_token_id)
    l_merged = _loss(merged, data.eval, tok.pad_token_id)
    l_adapter = _loss(PeftModel.from_pretrained(base, lay.student_adapter).eval(), data.eval,
                      tok.pad_token_id)
    assert abs(l_base - s["eval_loss_before"]) < 0.1, (l_base, s)
    assert abs(l_merged - s["eval_loss_after"]) < 0.1, (l_merged, s)
    assert abs(l_adapter - l_merged) < 0.05
    with open(os.path.join(lay.student_adapter, "adapter_config.json")) as f:
        acfg = json.load(f)
    assert acfg["r"] == 16 and acfg["base_model_name_or_path"] == base_path

    # ---- the generation stage resolves student.model=distilled to the merged folder (hf engine)
    assert os.path.samefile(resolve_model(cfg, cfg.student).path, lay.student_merged)
    with open(os.path.join(lay.distill, "samples.jsonl")) as f:
        samples = [json.loads(x) for x in f]
    assert len(samples) == 1 and samples[0]["student"] and samples[0]["teacher"].startswith("Step 1")
    assert samples[0]["user_id"] in {e.user_id for e in data.eval}

    # ---- manifest: hashes of what was used and made; a rerun is skipped as fresh
    m = s["manifest"]
    assert m["adapter_hash"] == _published_hash(lay.student_adapter, tmp_path)
    assert m["merged_hash"] == _published_hash(lay.student_merged, tmp_path)
    assert m["base_model_hash"] == hash_folder(base_path) and m["data_hash"] == data.data_hash
    assert m["eval_loss"] == s["eval_loss_after"] and m["prompt_version"] == data.prompt_version
    assert read_manifest(lay.distill)["status"] == "complete"
    assert run_stage("distill", cfg)["skipped"]
    print(f"test total {time.time() - t0:.1f}s")
