"""The recommender side of serving without Ray: top-k rules, text matching, a trained-run
checkpoint scored exactly like slim_ray.rec scores it (one history or a batch), the request plan
of ``Recommender`` (one call for a known user), and request parsing (limits, NaN, huge integers)."""

from __future__ import annotations

import numpy as np
import pytest

from slim_ray.config import load_config
from slim_ray.encode.encoder import encode_texts
from slim_ray.encode.store import load_embeddings
from slim_ray.serve.recommender import TextMatchScorer, load_scorer, top_k

from slim_ray.serve.recommender import Recommender

from serve_testdata import HISTORIES, STORED_RATIONALE, write_checkpoint, write_run


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers") / "run"
    cfg = load_config(None, [f"run_dir={root}", "rec.missing_rationale=learned", "rec.hidden=16",
                             "rec.params={num_layers: 1, inner: 32}", "rec.max_len=8"])
    write_run(cfg)
    return cfg


def test_top_k_excludes_history_padding_and_orders():
    s = np.array([9.0, 0.1, 0.9, 0.5, 0.9, -np.inf])
    assert top_k(s, exclude=[3], k=3) == [(2, 0.9), (4, 0.9), (1, 0.1)]  # ties: smaller id first
    assert top_k(s, exclude=[1, 2, 3, 4], k=5) == []  # padding (0) and -inf items never returned


def test_text_matching_scores_by_cosine(cfg):
    ids, vecs = load_embeddings(cfg.layout.item_embeddings)
    scorer = TextMatchScorer(ids, vecs)
    u = encode_texts([STORED_RATIONALE], dtype=cfg.encode.dtype)[0]
    best = [i for i, _ in top_k(scorer.scores([1], u), [1], 3)]
    assert set(best[:2]) == {6, 11}  # the other Star Wars films for a space-opera rationale
    # Without a rationale: the mean of the history's item vectors (Toy Story, Aladdin -> Lion King).
    s = scorer.scores(HISTORIES[2], None)
    q = vecs[[1, 6, 11]].mean(0)
    np.testing.assert_allclose(s[1:], vecs @ (q / np.linalg.norm(q)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rationale vector or a history"):
        scorer.scores([], None)


def test_checkpoint_scorer_matches_the_rec_model(cfg):
    import torch

    from slim_ray.rec.data import pad_right
    from slim_ray.serve.checkpoint import find_run

    with pytest.raises(FileNotFoundError, match="no finished recommender run"):
        find_run(cfg)
    assert isinstance(load_scorer(cfg), TextMatchScorer)  # auto: text matching until a run exists
    worse = write_checkpoint(cfg, best_valid=0.1, seed=1)
    best = write_checkpoint(cfg, best_valid=0.7, seed=0)
    assert find_run(cfg) == best  # chosen on validation NDCG
    assert find_run(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"checkpoint": worse})})) == worse
    scorer = load_scorer(cfg)
    assert scorer.name == "checkpoint:sasrec-slim-student-s0" and scorer.uses_rationales

    # Known user 1: the model's own path (last_user_vectors with its rationale table) ...
    model = scorer.model
    seq, lens = pad_right([np.asarray(HISTORIES[1])], scorer.max_len)
    with torch.no_grad():
        table = model.item_table()
        h = model.last_user_vectors(torch.from_numpy(seq), torch.from_numpy(lens), torch.tensor([1]), table)
        ref = (h @ table.T)[0].numpy()
    # ... equals serving with the stored rationale vector passed in explicitly.
    vec = scorer.stored_user_vector(1)
    assert vec is not None and scorer.stored_user_vector(2) is None  # user 2 has no rationale
    got = scorer.scores(HISTORIES[1], vec)
    np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-5, atol=1e-5)
    # User 2 without a rationale uses the run's learned fallback, as in training.
    seq, lens = pad_right([np.asarray(HISTORIES[2])], scorer.max_len)
    with torch.no_grad():
        ref2 = (model.last_user_vectors(torch.from_numpy(seq), torch.from_numpy(lens), torch.tensor([2]), table) @ table.T)[0].numpy()
    np.testing.assert_allclose(scorer.scores(HISTORIES[2], None)[1:], ref2[1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="384"):
        scorer.scores([1], np.ones(10, np.float32))

    # A batch is scored in one forward pass, row for row equal to scoring each history alone.
    hists, vecs = [HISTORIES[1], HISTORIES[2], [5, 9]], [vec, None, np.ones(384, np.float32)]
    many = scorer.scores_many(hists, vecs)
    for row, h, v in zip(many, hists, vecs):
        np.testing.assert_allclose(row[1:], scorer.scores(h, v)[1:], rtol=1e-5, atol=1e-5)
    assert scorer.version["checkpoint"] == "sasrec-slim-student-s0" and len(scorer.version["sha256"]) == 64


def test_recommender_plans_each_request_and_answers_a_batch_at_once(cfg):
    write_checkpoint(cfg, best_valid=0.7, seed=0)
    rec = Recommender(cfg)
    known = {"user_id": 1, "history": None, "k": 3, "explain": True, "student": True}
    raw = {"user_id": None, "history": [2, 7], "k": 3, "explain": False, "student": True}
    no_student = {**raw, "student": False}
    bad = [{"user_id": 99, "history": None, "k": 3}, {"user_id": None, "history": [1, 0, 77], "k": 3},
           {"user_id": None, "history": [], "k": 3}]
    out = rec.answer_many([known, raw, no_student, *bad])
    # known user: stored rationale vector and its text, answered in this one call
    assert out[0]["path"] == "stored-rationale" and out[0]["rationale"] == STORED_RATIONALE
    assert [it["id"] for it in out[0]["items"]] == [i for i, _ in top_k(
        rec.scorer.scores(HISTORIES[1], rec.scorer.stored_user_vector(1)), HISTORIES[1], 3)]
    assert out[0]["items"][0]["key"] == str(out[0]["items"][0]["id"]) and out[0]["items"][0]["title"]
    assert out[0]["version"]["checkpoint"] == "sasrec-slim-student-s0"
    assert out[1] == {"need_rationale": True, "history": [2, 7]}  # the student writes one first
    assert out[2]["path"] == "no-rationale" and len(out[2]["items"]) == 3
    assert out[3]["error"]["status"] == 404 and out[3]["error"]["field"] == "user_id"
    assert out[4]["error"]["field"] == "history" and "[0, 77]" in out[4]["error"]["message"]
    assert out[5]["error"]["status"] == 422
    # a known user without a stored rationale asks the student only when an explanation is wanted
    assert rec.answer_many([{"user_id": 2, "history": None, "k": 2, "explain": True, "student": True}]) == [
        {"need_rationale": True, "history": HISTORIES[2]}]
    assert rec.answer_many([{"user_id": 2, "history": None, "k": 2, "student": True}])[0]["path"] == "no-rationale"


def test_catalog_users_and_checkpoint_table_are_memory_mapped(cfg):
    """The catalogue's users come from the memory-mapped state (slim_ray.data.userstate), and a
    checkpoint's per-user rationale table is read from its mapped model.pt, equal to the vectors
    the run was built from; with a checkpoint the state holds no second copy of them."""
    import os

    from slim_ray.serve.checkpoint import CheckpointScorer
    from slim_ray.serve.recommender import user_state_spec
    from slim_ray.data.userstate import state_uri

    text = Recommender(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"recommender": "text"})}))
    users = text.catalog.users
    assert isinstance(users.history_items, np.memmap) and isinstance(users.vectors, np.memmap)
    assert dict(text.catalog.histories) == HISTORIES and text.catalog.rationales[1] == STORED_RATIONALE
    ids, vecs = load_embeddings(cfg.layout.user_embeddings("student"), kind="user")
    np.testing.assert_array_equal(users.vector(1), vecs[ids.tolist().index(1)])
    assert users.vector(2) is None and users.history(99) is None

    run = write_checkpoint(cfg, best_valid=0.7, seed=0)
    scorer = CheckpointScorer(run)
    with open("/proc/self/maps") as f:
        assert os.path.join(run, "model.pt") in f.read()
    np.testing.assert_array_equal(scorer.stored_user_vector(1), vecs[ids.tolist().index(1)])
    assert scorer.stored_user_vector(2) is None
    with_ckpt = Recommender(cfg)
    assert with_ckpt.catalog.users.vectors.shape[1] == 0 and with_ckpt.catalog.rationales[1] == STORED_RATIONALE
    # what `slim-ray serve` builds before the replicas start is the state they open
    assert user_state_spec(cfg) == ("student", False) and user_state_spec(text.cfg) == ("student", True)
    assert state_uri(cfg.layout, *user_state_spec(cfg)) == with_ckpt.catalog.users.folder
    assert state_uri(cfg.layout, *user_state_spec(text.cfg)) == users.folder


SETTINGS = {"max_k": 50, "max_history": 5, "max_rationale_chars": 20}


@pytest.mark.parametrize("body, status, field", [
    (b"", 400, "body"), (b"   ", 400, "body"), (b"{", 400, "body"), (b"\xff\xfe", 400, "body"),
    (b"[1, 2]", 422, "body"), (b"null", 422, "body"),
    (b'{"user_id": NaN}', 422, "user_id"), (b'{"history": [1, Infinity]}', 422, "history"),
    (b'{"k": -Infinity}', 422, "k"), (b'{"rationale": NaN}', 422, "rationale"), (b'{"k": 1e999}', 422, "k"),
    (b'{"user_id": 123456789012345678901234567890}', 422, "user_id"), (b'{"user_id": "1"}', 422, "user_id"),
    (b'{"user_id": 1.0}', 422, "user_id"), (b'{"user_id": true}', 422, "user_id"), (b'{"user_id": -1}', 422, "user_id"),
    (b'{"history": "1,2"}', 422, "history"), (b'{"history": [1, "2"]}', 422, "history"),
    (b'{"history": [1, 2, 3, 4, 5, 6]}', 422, "history"), (b'{"k": 0}', 422, "k"), (b'{"k": 51}', 422, "k"),
    (b'{"rationale": "' + b"x" * 21 + b'"}', 422, "rationale"), (b'{"explain": "yes"}', 422, "explain"),
    (b'{"user": 1}', 422, "user"), (b"[" * 100000, 400, "body"),
])
def test_bad_bodies_are_4xx_naming_the_field(body, status, field):
    from slim_ray.serve.deployments import ApiError, parse_request

    with pytest.raises(ApiError) as e:
        parse_request(body, SETTINGS)
    assert (e.value.status, e.value.field) == (status, field)
    assert e.value.message.startswith(field) and len(e.value.message) < 300


def test_good_bodies_parse():
    from slim_ray.serve.deployments import parse_request

    r = parse_request(b'{"history": [1, 2, 3, 4, 5], "k": 50, "explain": true, "rationale": "space films"}', SETTINGS)
    assert (r.history, r.k, r.explain, r.rationale, r.user_id) == ([1, 2, 3, 4, 5], 50, True, "space films", None)
    assert parse_request(b'{"user_id": 9223372036854775807}', SETTINGS).user_id == 2**63 - 1
