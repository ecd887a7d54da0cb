"""The SLIM serving graph over real HTTP on 127.0.0.1: known users, raw histories through the
student reasoner, batching in the encoder, and input errors."""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slim_ray.config import load_config
from slim_ray.data.schemas import ITEMS_SCHEMA, SEQUENCES_SCHEMA
from slim_ray.encode import store
from slim_ray.encode.encoder import EncoderSpec, encode_texts

MOVIES = [
    "Star Wars (1977). Genres: Action, Adventure, Sci-Fi, War.",
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "Sleepless in Seattle (1993). Genres: Comedy, Romance.",
    "Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller.",
    "Fargo (1996). Genres: Crime, Drama, Thriller.",
    "The Empire Strikes Back (1980). Genres: Action, Adventure, Sci-Fi, War.",
    "Aladdin (1992). Genres: Animation, Children's, Comedy, Musical.",
    "When Harry Met Sally... (1989). Genres: Comedy, Romance.",
    "Aliens (1986). Genres: Action, Sci-Fi, Thriller, War.",
    "Pulp Fiction (1994). Genres: Crime, Drama.",
    "Return of the Jedi (1983). Genres: Action, Adventure, Romance, Sci-Fi, War.",
    "The Lion King (1994). Genres: Animation, Children's, Musical.",
]
HISTORIES = {1: [1, 4, 9], 2: [2, 7], 3: [3, 8, 5]}
STORED_RATIONALE = "Step 1: the user loves space opera and science fiction adventures with wars in space."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_run(cfg) -> None:
    lay = cfg.layout
    ids = list(range(1, len(MOVIES) + 1))
    os.makedirs(lay.items)
    pq.write_table(pa.Table.from_pydict({
        "item_id": ids, "item_key": [str(i) for i in ids], "title": [m.split(" (")[0] for m in MOVIES],
        "categories": [[] for _ in ids], "brand": [None] * len(ids), "year": [None] * len(ids), "text": MOVIES,
    }, schema=ITEMS_SCHEMA), os.path.join(lay.items, "part-0.parquet"))
    os.makedirs(lay.sequences)
    users = sorted(HISTORIES)
    pq.write_table(pa.Table.from_pydict({
        "user_id": users, "user_key": [str(u) for u in users], "item_ids": [HISTORIES[u] for u in users],
        "timestamps": [list(range(len(HISTORIES[u]))) for u in users],
    }, schema=SEQUENCES_SCHEMA), os.path.join(lay.sequences, "part-0.parquet"))
    # Embeddings in the contract, as the encode stage writes them (same encoder settings).
    spec = EncoderSpec.from_config(cfg.encode)
    for folder, kind, rows, texts in [
        (lay.item_embeddings, "item", ids, MOVIES),
        (lay.user_embeddings("student"), "user", [1], [STORED_RATIONALE]),
    ]:
        vecs = encode_texts(texts, dtype=cfg.encode.dtype)
        os.makedirs(folder)
        store.write_part(pa.Table.from_arrays([
            pa.array(rows, pa.int64()), pa.array([kind] * len(rows)), pa.array([spec.model_id] * len(rows)),
            pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1]),
            pa.array([spec.key(t) for t in texts]),
        ], schema=store.output_schema(vecs.shape[1])), folder)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from slim_ray.serve.app import start, stop

    run = tmp_path_factory.mktemp("serve") / "run"
    cfg = load_config(None, [
        f"run_dir={run}", f"serve.port={_free_port()}", "serve.app_name=slim-test",
        "serve.reasoner_max_new_tokens=24", "serve.batch_wait_timeout_s=0.2", "serve.max_batch_size=8",
    ])
    _write_run(cfg)
    url = start(cfg)
    client = httpx.Client(base_url=url, timeout=120)
    yield cfg, client
    client.close()
    stop(cfg)


def _ids(resp) -> list[int]:
    return [it["item_id"] for it in resp["items"]]


def test_known_user_gets_topk_without_history(server):
    cfg, client = server
    assert client.get("/healthz").json() == {"ok": True}
    info = client.get("/info").json()
    assert info["items"] == 12 and info["users"] == 3 and info["scorer"] == "text-match"

    r = client.post("/recommend", json={"user_id": 1, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "stored-rationale" and len(body["items"]) == 5
    assert not set(_ids(body)) & set(HISTORIES[1])  # never an item of the history
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # The stored rationale is about space opera: the other Star Wars films lead the list.
    assert set(_ids(body)[:3]) == {6, 11, 3} or {6, 11} <= set(_ids(body)[:3])

    # A user without a stored rationale: history-only matching (mean of its item vectors).
    body = client.post("/recommend", json={"user_id": 2, "k": 3}).json()
    assert body["path"] == "history" and body["rationale"] is None
    ids, vecs = store.load_embeddings(cfg.layout.item_embeddings)
    q = vecs[[0 + 1, 6]].mean(axis=0)  # items 2 and 7 (row = id - 1)
    q /= np.linalg.norm(q)
    expect = [int(i) for i in ids[np.argsort(-(vecs @ q))] if i not in HISTORIES[2]][:3]
    assert _ids(body) == expect
    assert 12 in _ids(body)  # The Lion King, next to Toy Story and Aladdin


def test_unseen_user_raw_history_goes_through_the_student(server):
    _, client = server
    r = client.post("/recommend", json={"history": [2, 7, 12], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "student-rationale"
    assert isinstance(body["rationale"], str) and len(body["rationale"].split()) >= 3
    assert len(body["items"]) == 4 and not set(_ids(body)) & {2, 7, 12}
    assert body["timings_ms"]["reason_ms"] > 0 and body["timings_ms"]["encode_ms"] > 0


def test_encoder_batches_concurrent_requests_and_errors(server):
    from ray import serve

    cfg, client = server
    texts = [f"Step 1: the user likes {g} films." for g in
             ["animated", "romantic", "crime", "horror", "war", "musical", "family", "space"]]
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda t: client.post("/recommend", json={"history": [1], "rationale": t, "k": 3}).json(), texts))
    assert all(b["path"] == "given-rationale" and len(b["items"]) == 3 for b in bodies)
    stats = serve.get_deployment_handle("EncoderDeployment", cfg.serve.app_name).stats.remote().result()
    assert stats["max_batch"] > 1  # @serve.batch merged concurrent requests

    r = client.post("/recommend", json={"history": [1, 999]})
    assert r.status_code == 400 and "999" in r.json()["detail"]
    r = client.post("/recommend", json={"user_id": 12345})
    assert r.status_code == 404 and "12345" in r.json()["detail"]
    r = client.post("/recommend", json={"user_id": 1, "k": 1000})
    assert r.status_code == 400 and "max_k" in r.json()["detail"]
