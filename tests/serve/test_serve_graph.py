"""The SLIM serving graph over real HTTP on 127.0.0.1 (Ray Serve): a trained-run checkpoint behind
the recommender deployment, known users, an unseen user's raw history through the student
reasoner and the batched encoder, and input errors."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from slim_ray.config import load_config
from slim_ray.encode.encoder import encode_texts

from serve_testdata import HISTORIES, write_checkpoint, write_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from slim_ray.serve.app import start, stop

    run = tmp_path_factory.mktemp("serve") / "run"
    cfg = load_config(None, [
        f"run_dir={run}", f"serve.port={_free_port()}", "serve.app_name=slim-test", "serve.log_level=WARNING",
        "serve.reasoner_max_new_tokens=24", "serve.batch_wait_timeout_s=0.2", "serve.max_batch_size=8",
        "rec.missing_rationale=learned", "rec.hidden=16", "rec.params={num_layers: 1, inner: 32}", "rec.max_len=8",
    ])
    write_run(cfg)
    write_checkpoint(cfg)
    url = start(cfg)
    client = httpx.Client(base_url=url, timeout=120)
    yield cfg, client
    client.close()
    stop(cfg)


@pytest.fixture(scope="module")
def offline(server):
    """The same checkpoint, scored in this process (no Serve): what every answer must equal."""
    from slim_ray.serve.recommender import load_scorer, top_k

    scorer = load_scorer(server[0])
    return lambda history, vec, k: [i for i, _ in top_k(scorer.scores(history, vec), history, k)], scorer


def _ids(body) -> list[int]:
    return [it["item_id"] for it in body["items"]]


def test_known_users_get_the_checkpoints_topk_without_history(server, offline):
    cfg, client = server
    rank, scorer = offline
    assert client.get("/healthz").json() == {"ok": True}
    info = client.get("/info").json()
    assert info["scorer"] == "checkpoint:sasrec-slim-student-s0" and info["uses_rationales"]
    assert info["items"] == 12 and info["users"] == 3
    assert info["reasoner_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # no distilled export here
    assert info["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"

    r = client.post("/recommend", json={"user_id": 1, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "stored-rationale" and len(body["items"]) == 5
    assert not set(_ids(body)) & set(HISTORIES[1])  # never an item of the history
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert _ids(body) == rank(HISTORIES[1], scorer.stored_user_vector(1), 5)
    assert body["items"][0]["title"]

    body = client.post("/recommend", json={"user_id": 2, "k": 3}).json()  # no stored rationale
    assert body["path"] == "history" and body["rationale"] is None
    assert _ids(body) == rank(HISTORIES[2], None, 3) and not set(_ids(body)) & set(HISTORIES[2])


def test_unseen_user_raw_history_goes_through_the_student(server, offline):
    cfg, client = server
    rank, _ = offline
    history = [2, 7, 12]
    r = client.post("/recommend", json={"history": history, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "student-rationale"
    assert isinstance(body["rationale"], str) and len(body["rationale"].split()) >= 3
    assert len(body["items"]) == 4 and not set(_ids(body)) & set(history)
    assert body["timings_ms"]["reason_ms"] > 0 and body["timings_ms"]["encode_ms"] > 0
    # The served ranking is the checkpoint's ranking for the encoded rationale.
    vec = encode_texts([body["rationale"]], dtype=cfg.encode.dtype)[0]
    assert _ids(body) == rank(history, vec, 4)
    # Greedy decoding: the same history gets the same rationale.
    assert client.post("/recommend", json={"history": history, "k": 4}).json()["rationale"] == body["rationale"]


def test_encoder_batches_concurrent_requests_and_errors(server):
    from ray import serve

    cfg, client = server
    texts = [f"Step 1: the user likes {g} films." for g in
             ["animated", "romantic", "crime", "horror", "war", "musical", "family", "space"]]
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(
            lambda t: client.post("/recommend", json={"history": [1], "rationale": t, "k": 3}).json(), texts))
    assert all(b["path"] == "given-rationale" and len(b["items"]) == 3 for b in bodies)
    stats = serve.get_deployment_handle("EncoderDeployment", cfg.serve.app_name).stats.remote().result()
    assert stats["max_batch"] > 1  # @serve.batch merged concurrent requests

    r = client.post("/recommend", json={"history": [1, 999]})
    assert r.status_code == 400 and "999" in r.json()["detail"]
    r = client.post("/recommend", json={"user_id": 12345})
    assert r.status_code == 404 and "12345" in r.json()["detail"]
    r = client.post("/recommend", json={"user_id": 1, "k": 1000})
    assert r.status_code == 400 and "max_k" in r.json()["detail"]
