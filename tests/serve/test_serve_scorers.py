"""The recommender side of serving without Ray: top-k rules, text matching, and a trained-run
checkpoint scored exactly like slim_ray.rec scores it."""

from __future__ import annotations

import numpy as np
import pytest

from slim_ray.config import load_config
from slim_ray.encode.encoder import encode_texts
from slim_ray.encode.store import load_embeddings
from slim_ray.serve.recommender import TextMatchScorer, load_scorer, top_k

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
    from slim_ray.serve.checkpoint import CheckpointScorer, find_run

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
