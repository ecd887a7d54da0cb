"""A recommender run folder on S3 (moto's server on loopback): train on Ray Train, evaluate and
report, every byte in the bucket and nothing in a local run folder."""

import os
import uuid

import pytest

from conftest import make_bucket
from rec_testdata import synthetic_run
from slim_ray import storage
from slim_ray.config import load_config
from slim_ray.rec.checkpoint import finished_runs, is_finished, load_run


def _workers_see(env_key: str) -> bool:
    """Whether Ray's workers have the S3 endpoint (they inherit the environment Ray started with)."""
    import ray

    @ray.remote(num_cpus=0)
    def get():
        return os.environ.get(env_key)

    return ray.get(get.remote()) == os.environ.get(env_key)


def _manifest(folder: str, summary: dict) -> None:
    storage.write_json(storage.join(folder, "manifest.json"), {"status": "complete", "summary": summary})


def test_train_evaluate_report_on_s3(s3_server, ray_session, tmp_path, monkeypatch):
    if not _workers_see("AWS_ENDPOINT_URL"):
        pytest.skip("this session's Ray started before the S3 server: its workers cannot reach it")
    monkeypatch.chdir(tmp_path)  # a stray local write of the run folder would land here
    root = make_bucket(f"rec-{uuid.uuid4().hex[:8]}") + "/run"
    synthetic_run(root, n_users=40, n_items=40, text_dim=8, roles=("student",))
    cfg = load_config(None, [f"run_dir={root}", "rec.backbone=gru4rec", "rec.mode=slim:student", "rec.epochs=2",
                             "rec.hidden=16", "rec.max_len=8", "rec.batch_size=32", "evaluate.num_negatives=5"])
    from slim_ray.rec.stage import run_evaluate, run_train

    summary = run_train(cfg)
    assert summary["trained"] == 1 and len(summary["node_ids"]) == 1
    assert summary["runs"]["gru4rec-slim-student-s0"]["rationale_protocol"] == "consistent"
    run = cfg.layout.rec_run("gru4rec", "slim", 0, "student")
    assert run.startswith("s3://") and is_finished(run) and finished_runs(cfg.layout.rec) == [run]
    model, meta = load_run(run)
    assert meta["node_ids"] == summary["node_ids"] and model.user_text.shape == (41, 8)
    assert run_train(cfg)["skipped"] == 1  # freshness read from the bucket

    run_evaluate(cfg)
    metrics = storage.read_json(storage.join(cfg.layout.eval, "metrics.json"))
    assert metrics["results"]["gru4rec"]["slim:student"]["seeds"] == [0]
    assert storage.is_file(storage.join(cfg.layout.eval, "candidates", "key.json"))
    assert storage.parquet_files(storage.join(cfg.layout.eval, "per_user"))

    _manifest(cfg.layout.distill, {"strategy": "ddp", "method": "full", "num_workers": 2, "steps": 7,
                                   "manifest": {"base_model": "Qwen/Qwen2.5-0.5B-Instruct"}})
    _manifest(cfg.layout.rationales("student"), {"engine": "vllm", "model_id": "distilled-student",
                                                 "generated_rows": 40})
    from slim_ray.report import build_report

    out = build_report(root)
    report = storage.read_text(out["report"])
    assert "full fine-tune of `Qwen/Qwen2.5-0.5B-Instruct`, torch DDP on 2 workers, 7 steps" in report
    assert "with the `vllm` engine" in report
    assert "SmolLM2" not in report and "ZeRO" not in report
    for png in ("metrics_sampled.png", "metrics_full.png", "throughput.png"):
        assert storage.info(storage.join(cfg.layout.report, png)).size > 5000
    assert os.listdir(tmp_path) == [] and not os.path.exists("s3:")
