"""End to end: the real `slim-ray run --config configs/quick.yaml` command on a MovieLens-100K slice.

The command runs in a subprocess with a clean environment (nothing set for it but PATH, HOME and
offline HF), exactly as a user starts it. While it runs, every process of its tree (the driver, the
GCS, raylets, Ray Data actors, Ray Train workers with their rendezvous and gloo sockets) is polled
for listening sockets: all must be on loopback. Asserts that every stage produced its contract,
that the leakage guard holds (rationales see only the training prefix), that every recommender
variant beats the random ranker, that the console stays short off a terminal, and that an
immediate rerun skips every stage. Then the real `slim-ray serve` over that run, watched the same
way while it answers requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pytest

from listeners import ListenerWatch
from slim_ray.config import load_config
from slim_ray.data import io
from slim_ray.data.schemas import embeddings_schema, check_columns
from slim_ray.stages import PIPELINE_ORDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIM_RAY = os.path.join(os.path.dirname(sys.executable), "slim-ray")
# What a user's shell has: no RAY_* variables, no PYTHONPATH tricks of this test session.
CLEAN_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "SLIM_RAY_CACHE", "TMPDIR")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in CLEAN_ENV_KEYS if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def run_watched(cmd: list[str], log_path: str, timeout: float) -> tuple[int, set[str], float]:
    """Run ``cmd`` with a clean environment, its output to ``log_path``; poll its tree's listeners."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        with ListenerWatch(proc.pid) as watch:
            try:
                rc = proc.wait(timeout=timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
    return rc, watch.bad, time.time() - t0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    run_dir = str(tmp / "run")
    cmd = [SLIM_RAY, "run", "--config", "configs/quick.yaml", "--set", f"run_dir={run_dir}"]
    rc1, bad1, first_s = run_watched(cmd, str(tmp / "first.log"), timeout=3000)
    console = open(tmp / "first.log").read()
    assert rc1 == 0, console[-4000:]
    first = json.load(open(os.path.join(run_dir, "run_summary.json")))["stages"]
    rc2, bad2, second_s = run_watched(cmd, str(tmp / "second.log"), timeout=600)
    assert rc2 == 0, open(tmp / "second.log").read()[-3000:]
    second = json.load(open(os.path.join(run_dir, "run_summary.json")))["stages"]
    cfg = load_config(os.path.join(ROOT, "configs", "quick.yaml"), [f"run_dir={run_dir}"])
    return {"cfg": cfg, "console": console, "bad": bad1 | bad2, "first_s": first_s, "second_s": second_s,
            "first": first, "second": second}


def test_real_command_listens_only_on_loopback(quick_run):
    assert not quick_run["bad"], "non-loopback listeners: " + "; ".join(sorted(quick_run["bad"]))


def test_real_serve_command_listens_only_on_loopback(quick_run, tmp_path):
    """``slim-ray serve`` over the finished run, started as a user starts it: while it serves, every
    process of its tree (Ray, the Serve controller, HTTP proxy and replicas) listens on loopback."""
    import signal

    import httpx

    from slim_ray.scale.standin import free_port

    port = free_port()
    cmd = [SLIM_RAY, "serve", "--config", "configs/quick.yaml", "--port", str(port),
           "--set", f"run_dir={quick_run['cfg'].run_dir}", "serve.reasoner=false"]
    served = []
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=log, text=True,
                            stdin=subprocess.DEVNULL)
    with ListenerWatch(proc.pid, port=port) as watch:
        try:
            ready = False
            for line in proc.stdout:  # ends at "ready", or when the command exits
                if "ready" in line:
                    ready = True
                    break
            assert ready and proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                served = [c.post("/v1/recommend", json={"user_id": 1, "k": 5}).status_code,
                          c.post("/v1/recommend", json={"history": [1, 2, 3], "k": 5}).status_code]
            time.sleep(1.0)  # one more round of the watch with every replica up
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    assert served == [200, 200], served
    assert watch.port_ips and watch.port_ips <= {"127.0.0.1", "::1"}, watch.port_ips
    assert not watch.bad, "non-loopback listeners while serving: " + "; ".join(sorted(watch.bad))


def test_console_is_short_and_names_every_stage(quick_run):
    lines = quick_run["console"].splitlines()
    for st in PIPELINE_ORDER:
        assert any(ln.startswith(f"[slim-ray] {st}: done in") for ln in lines), (st, lines[-40:])
    assert not any("Reporting training result" in ln for ln in lines)
    assert len(lines) < 250, f"{len(lines)} console lines; first 60:\n" + "\n".join(lines[:60])


def test_every_stage_ran_then_rerun_skips_all(quick_run):
    cfg = quick_run["cfg"]
    first, second = quick_run["first"], quick_run["second"]
    assert [r["stage"] for r in first] == [r["stage"] for r in second] == PIPELINE_ORDER
    assert not any(r["skipped"] for r in first) and all(r["status"] == "complete" for r in first)
    assert all(r["skipped"] for r in second), [r["stage"] for r in second if not r["skipped"]]
    assert quick_run["second_s"] < quick_run["first_s"] / 5
    for st in PIPELINE_ORDER:
        from slim_ray.stages import STAGES

        m = json.load(open(os.path.join(STAGES[st].output(cfg), "manifest.json")))
        assert m["status"] == "complete" and m["stage"] == st


def test_contracts_and_leakage_guard(quick_run):
    cfg = quick_run["cfg"]
    lay = cfg.layout
    items = io.read_items(lay.items)
    seqs = io.read_sequences(lay.sequences)
    assert seqs.num_rows == 200  # data.max_users
    n_items = items.num_rows
    assert sorted(items["item_id"].to_pylist()) == list(range(1, n_items + 1))
    lengths = {u: len(s) for u, s in zip(seqs["user_id"].to_pylist(), seqs["item_ids"].to_pylist())}
    seq_by_user = dict(zip(seqs["user_id"].to_pylist(), seqs["item_ids"].to_pylist()))
    title = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))

    teacher = io.read_rationales(lay.rationales("teacher"))
    student = io.read_rationales(lay.rationales("student"))
    assert teacher.num_rows == 16 and set(teacher["role"].to_pylist()) == {"teacher"}
    assert student.num_rows == len(lengths) and set(student["role"].to_pylist()) == {"student"}
    assert len(pc.unique(student["user_id"])) == student.num_rows
    for tbl in (teacher, student):
        assert pc.sum(pc.is_null(tbl["error"])).as_py() == tbl.num_rows
        for uid, plen, prompt in zip(tbl["user_id"].to_pylist(), tbl["prefix_len"].to_pylist(),
                                     tbl["prompt"].to_pylist()):
            assert 1 <= plen <= lengths[uid] - 2  # leakage guard
            seq = seq_by_user[uid]
            prefix_titles = {title[i] for i in seq[:plen]}
            for held_out in seq[-2:]:  # validation and test items never reach the prompt
                if title[held_out] not in prefix_titles and len(title[held_out]) > 6:
                    assert title[held_out] not in prompt, (uid, title[held_out])

    item_emb = io.read_table(lay.item_embeddings)
    check_columns(item_emb, embeddings_schema(384), lay.item_embeddings)
    assert item_emb.num_rows == n_items
    for role, n in (("teacher", 16), ("student", len(lengths))):
        emb = io.read_table(lay.user_embeddings(role))
        assert emb.num_rows == n and set(emb["kind"].to_pylist()) == {"user"}
        v = np.stack(emb["vector"].to_numpy(zero_copy_only=False))
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)


def test_every_variant_beats_random_and_report_written(quick_run):
    cfg = quick_run["cfg"]
    metrics = json.load(open(os.path.join(cfg.layout.eval, "metrics.json")))
    rnd = metrics["random"]["sampled"]["ndcg@10"]
    variants = {(bb, v) for bb, vs in metrics["results"].items() for v in vs}
    assert variants == {(bb, v) for bb in ("sasrec", "gru4rec")
                        for v in ("id", "id_text", "slim:teacher", "slim:student", "text:student")}
    for bb, vs in metrics["results"].items():
        for v, e in vs.items():
            ndcg = e["mean"]["sampled"]["ndcg@10"]
            assert ndcg > 1.5 * rnd, (bb, v, ndcg, rnd)
    report = open(os.path.join(cfg.layout.report, "report.md")).read()
    assert "Sampled-100" in report and "Full ranking" in report and "SLIM (student rationales)" in report
    # the cost table names the distilled student by its folder's last parts, not the run's absolute path
    student_row = next(line for line in report.splitlines() if line.startswith("| student | "))
    assert student_row.startswith("| student | merged:…/distill/merged#"), student_row
    assert os.path.abspath(cfg.run_dir) not in student_row, student_row
    for png in ("metrics_sampled.png", "metrics_full.png", "throughput.png"):
        assert os.path.getsize(os.path.join(cfg.layout.report, png)) > 5000
