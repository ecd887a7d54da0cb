"""The scale harness end to end at 10k users: the real `slim-ray bench scale --address` command
against a Ray head on 127.0.0.1 started by cluster/local_start.sh (token auth on), each stage its
own `slim-ray` process joining it, the LLM stages against the stand-in server. One head for every
stage keeps the harness under 3 minutes (a local Ray per stage adds its start to each); it is also
what users run on a cluster, and it checks that a driver joins a loopback head (Ray would otherwise
dial the machine's outward IP and wait for ever) with the cluster's token.

Asserts the contracts of every stage (row counts that must agree from stage to stage, no duplicate
row) and that every figure the harness records is there and plausible; never times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pytest

import localcluster
from slim_ray import storage
from slim_ray.generate.store import part_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USERS = 10_000
STAGES = ["synth", "prepare", "teach", "reason", "encode", "train", "evaluate"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST", "AWS_")) and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture
def ray_head(tmp_path):
    """A one-node Ray head on 127.0.0.1 (cluster/local_start.sh), stopped by its recorded PID."""
    state = tmp_path / "cluster.env"
    env = dict(_env(), NUM_CPUS="2", START_TIMEOUT_S="300", RAY_BIN=os.path.join(os.path.dirname(sys.executable), "ray"))
    start = localcluster.start(state, env)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-3000:]
    try:
        yield localcluster.read_state(state)
    finally:
        localcluster.stop(state)


def _rows(folder: str, columns: list[str]):
    return storage.read_table(folder, columns=columns)


@pytest.mark.slow
def test_bench_scale_at_10k_users_keeps_every_contract(tmp_path, ray_head):
    out, md = tmp_path / "bench", tmp_path / "BENCHMARKS.md"
    exe = os.path.join(os.path.dirname(sys.executable), "slim-ray")
    gcs = ray_head["RAY_GCS_ADDRESS"]
    assert gcs.startswith("127.0.0.1:") and ray_head["RAY_AUTH_MODE"] == "token"
    proc = subprocess.run([exe, "bench", "scale", "--users", str(USERS), "--stages", ",".join(STAGES),
                           "--out", str(out), "--markdown", str(md), "--latency-ms", "2", "--words", "16",
                           "--address", gcs, "--set", "teacher.num_users=500", "rec.max_steps=30", "rec.epochs=1"],
                          cwd=ROOT, env=dict(_env(), RAY_AUTH_MODE="token"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["address"] == gcs
    run = out / str(USERS) / "run"
    # encode and train ran on the same Ray node, the head's: a stage with a Ray of its own has another id
    encode_nodes = json.loads((run / "embeddings" / "manifest.json").read_text())["summary"]["node_ids"]
    train_nodes = [json.loads(f.read_text())["node_ids"] for f in (run / "rec").glob("*/meta.json")]
    assert len(encode_nodes) == 1 and train_nodes == [encode_nodes], (encode_nodes, train_nodes)
    r = results["sizes"][str(USERS)]
    assert list(r) == STAGES

    seqs = _rows(str(run / "prepared" / "sequences"), ["user_id", "item_ids"])
    items = _rows(str(run / "prepared" / "items"), ["item_id"])
    n_users, n_items = seqs.num_rows, items.num_rows
    assert 0.5 * USERS < n_users <= USERS and r["prepare"]["rows"] == n_users
    assert r["synth"]["rows"] == int(json.loads((out / str(USERS) / "synth" / "synth.json").read_text())
                                     ["summary"]["interactions"])

    # teach: the fixed sample; reason: every user with a training prefix; one row per key
    for stage, role, expected in [("teach", "teacher", min(500, n_users)), ("reason", "student", n_users)]:
        t = _rows(str(run / "rationales" / role), ["user_id", "rationale_key", "error"])
        assert t.filter(pc.is_valid(t["error"])).num_rows == 0
        assert t.num_rows == expected == r[stage]["rows"], (stage, t.num_rows, expected)
        # no duplicate row: one per user (users with the same history prefix share a rationale_key)
        assert len(set(zip(t["user_id"].to_pylist(), t["rationale_key"].to_pylist()))) == t.num_rows
        assert len(set(t["user_id"].to_pylist())) == t.num_rows
        assert r[stage]["note"].startswith("LLM stand-in")
        assert len(part_files(str(run / "rationales" / role))) == r[stage]["output_files"] - 2  # + manifest, config

    # encode: one vector per item and per student rationale
    assert _rows(str(run / "embeddings" / "items"), ["id"]).num_rows == n_items
    assert _rows(str(run / "embeddings" / "student"), ["id"]).num_rows == n_users
    assert r["encode"]["rows"] == n_items + n_users

    # train: one finished run over every user, through Ray Data, stopped at max_steps; evaluate: every user scored
    assert r["train"]["rows"] == n_users and r["train"]["workers"] == 2
    assert r["train"]["ingest"] == "dataset" and r["train"]["steps"] == 30 and r["train"]["examples"] == 30 * 256
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["num_users"] == n_users == r["evaluate"]["rows"]

    for stage in STAGES:  # every figure recorded, and plausible
        f = r[stage]
        assert f["rc"] == 0 and f["wall_s"] > 0 and f["cpu_s"] > 0, (stage, f)
        assert 50 < f["driver_rss_mib"] <= f["tree_rss_mib"], (stage, f)
        assert f["output_bytes"] > 0 and f["output_files"] > 0, (stage, f)
    text = md.read_text()
    assert "LLM stand-in" in text and f"| reason † | {USERS:,} |" in text
    assert (tmp_path / "docs" / "img" / "scale" / "seconds_per_1k_users.png").stat().st_size > 1000
