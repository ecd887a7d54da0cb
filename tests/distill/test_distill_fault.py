"""Fault tolerance: SIGKILL a Ray Train worker mid-run; the run restores from the latest
checkpoint and finishes, and no step done before that checkpoint is trained again.

ZeRO-3 on purpose: the restored state is partitioned across ranks (params and optimizer).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

from distill_fixtures import write_run

from slim_ray.config import load_config

TOTAL, EVERY = 8, 3


def _read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_worker_kill_restores_from_checkpoint(ray_session, tmp_path):
    from slim_ray.distill.stage import run_distill

    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    name = f"kill-{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"distill.run_name={name}", "distill.max_length=256",
        f"distill.max_steps={TOTAL}", f"distill.checkpoint_every={EVERY}", "distill.batch_size=2",
        "distill.lr=1e-3", "distill.zero_stage=3", "distill.max_failures=2", "distill.num_samples=0",
        "distill.export_merged=false",
    ])
    log = os.path.join(os.path.abspath(cfg.layout.distill), "logs", f"{name}.jsonl")
    killed: dict = {}

    def killer():
        # Rank 0 logs every finished step with its pid; kill it one step after the first checkpoint.
        deadline = time.time() + 600
        while time.time() < deadline:
            recs = _read_log(log)
            if recs and recs[-1]["step"] >= EVERY + 1:
                killed.update(pid=recs[-1]["pid"], after_step=recs[-1]["step"])
                os.kill(recs[-1]["pid"], signal.SIGKILL)
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.time()
    summary = run_distill(cfg)
    t.join(timeout=5)
    print(f"worker-kill run took {time.time() - t0:.1f}s, killed {killed}")
    assert killed, "the killer never saw a step past the first checkpoint"

    recs = _read_log(log)
    first = [r for r in recs if r["pid"] == killed["pid"]]
    second = [r for r in recs if r["pid"] != killed["pid"]]
    assert first and second, recs
    resumed_at = second[0]["step"] - 1  # the checkpoint the restored run started from
    assert resumed_at % EVERY == 0 and EVERY <= resumed_at < killed["after_step"] + 1
    # steps up to the checkpoint ran exactly once; the run finished all steps
    steps = [r["step"] for r in recs]
    for s in range(1, resumed_at + 1):
        assert steps.count(s) == 1, steps
    assert [r["step"] for r in second] == list(range(resumed_at + 1, TOTAL + 1))
    assert summary["steps"] == TOTAL
    # the redone step saw the same batch (data position), and -- model, optimizer, scheduler and
    # RNG restored -- produced the same loss and learning rate as its first try
    redo = {r["step"]: r for r in first if r["step"] > resumed_at}
    for r in second:
        if r["step"] in redo:
            assert r["samples"] == redo[r["step"]]["samples"]
            assert abs(r["lr"] - redo[r["step"]]["lr"]) < 1e-12
            assert abs(r["loss"] - redo[r["step"]]["loss"]) < 2e-3, (r, redo[r["step"]])
    assert redo, "the kill landed exactly on a checkpoint; nothing was redone"
    # and it still learned: held-out loss fell; the export holds the adapter
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert os.path.exists(os.path.join(cfg.layout.student_adapter, "adapter_model.safetensors"))
