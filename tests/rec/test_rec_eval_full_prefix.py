"""``evaluate.rationales: [cut, full_prefix]``: a consistent-protocol SLIM run is scored twice in one
evaluation, with the rationale it was trained on and with a second one written from the whole
training prefix (``embeddings/<role>-full/``); the second reading equals a run folder whose stored
table is that set, it gets its own paired test, and a missing set is a clear error."""

import numpy as np
import pytest
import torch

from rec_testdata import publish_untrained_run, synthetic_run, write_vectors
from slim_ray import storage
from slim_ray.config import load_config
from slim_ray.layout import RunLayout
from slim_ray.rec import data as rd
from slim_ray.rec.checkpoint import load_state, write_run
from slim_ray.rec.evaluate import evaluate_all, evaluate_run

U, N_ITEMS, DIM, NEG, KS = 60, 40, 8, 15, [5, 10]


def _publish(root: str, bb: str, mode: str, role, seed: int) -> str:
    """An untrained (seeded) model published as a finished consistent-protocol run folder; its
    learned no-rationale vector is not zero, so fallback users differ from zeros."""
    init = (lambda model: model.no_rationale.data.normal_()) if role else None
    return publish_untrained_run(root, bb, mode, role, seed,
                                 [f"rec.hidden={DIM}", "rec.max_len=8", "rec.rationale_protocol=consistent"],
                                 torch_seed=seed + 7, n_items=N_ITEMS, init=init)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fullprefix"))
    synthetic_run(root, n_users=U, n_items=N_ITEMS, text_dim=DIM, roles=("student",))
    _publish(root, "sasrec", "id", None, 0)
    for seed in (0, 1):
        _publish(root, "sasrec", "slim", "student", seed)
    return root


def _cfg(root, rationales: str):
    return load_config(None, [f"run_dir={root}", f"evaluate.num_negatives={NEG}", "evaluate.ks=[5,10]",
                              "evaluate.batch_users=16", f"evaluate.rationales={rationales}"])


def test_missing_full_prefix_set_is_named(ray_session, root):
    with pytest.raises(FileNotFoundError, match=r"student-full: no rationale vectors.*student\.eval_rationale="
                                                r"full_prefix.*encode\.roles including student-full"):
        evaluate_all(_cfg(root, "[cut, full_prefix]"))


def test_full_prefix_reading_is_the_same_model_with_the_second_table(ray_session, root, tmp_path):
    lay = RunLayout(root)
    # the second set: other vectors for all but the last 10 users (they fall back to the learned vector)
    full_ids = np.arange(1, U - 9)
    full_vecs = np.random.default_rng(5).normal(size=(len(full_ids), DIM))
    write_vectors(lay.user_embeddings("student-full"), full_ids, full_vecs, "user")
    try:
        m, _ = evaluate_all(_cfg(root, "[cut, full_prefix]"))
        res = m["results"]["sasrec"]
        assert set(res) == {"id", "slim:student", "slim:student+full"}
        assert m["rationales"] == {"read": ["cut", "full_prefix"], "full_prefix_missing": {}}
        cut, full = res["slim:student"], res["slim:student+full"]
        assert cut["runs"] == full["runs"] == ["rec/sasrec-slim-student-s0", "rec/sasrec-slim-student-s1"]
        assert cut["n_users"] == full["n_users"] == m["num_users"]

        # the reference: each run folder copied with the second set as its stored table
        data = rd.load_sequences(lay.sequences, None, N_ITEMS)
        table, has, _ = rd.user_text_table(lay.user_embeddings("student-full"), data.user_ids, U, "zeros")
        assert has.sum() == len(full_ids)
        for seed in (0, 1):
            run_dir = lay.rec_run("sasrec", "slim", seed, "student")
            state = load_state(run_dir)
            state["user_text"], state["user_has_text"] = torch.from_numpy(table), torch.from_numpy(has)
            ref_dir = str(tmp_path / f"ref-s{seed}")
            write_run(ref_dir, state, storage.read_json(storage.join(run_dir, "meta.json")))
            pu, _ = evaluate_run(ref_dir, data, None, KS, 64)
            pu_cut, _ = evaluate_run(run_dir, data, None, KS, 64)
            got_full, got_cut = full["per_seed"][str(seed)]["full"], cut["per_seed"][str(seed)]["full"]
            for name in ("ndcg@10", "hr@10", "mrr@5"):
                assert got_full[name] == pytest.approx(float(np.mean(pu["full"][name])), abs=1e-9)
                assert got_cut[name] == pytest.approx(float(np.mean(pu_cut["full"][name])), abs=1e-9)
            # another table gives other rankings
            assert not np.array_equal(pu["full"]["ndcg@10"], pu_cut["full"]["ndcg@10"])
        # its own paired test against the baseline, per ranking protocol
        for p in ("sampled", "full"):
            sig = m["significance"]["sasrec"]["slim:student+full"][p]
            assert sig["baseline"] == "id" and 0.0 <= sig["p_ttest"] <= 1.0 and sig["n_users"] == m["num_users"]
            assert sig["mean_a"] == pytest.approx(full["mean"][p]["ndcg@10"], abs=1e-9)
        per_user = storage.read_table(storage.join(root, "eval", "per_user"))
        runs = set(per_user.column("run").to_pylist())
        assert {"sasrec-slim-student-s0+full", "sasrec-slim-student-s1+full", "sasrec-slim-student-s0"} <= runs

        # only the full-prefix reading: the cut reading of those runs is left out, baselines stay
        m2, _ = evaluate_all(_cfg(root, "[full_prefix]"))
        assert set(m2["results"]["sasrec"]) == {"id", "slim:student+full"}
        assert m2["results"]["sasrec"]["slim:student+full"]["mean"] == full["mean"]
    finally:
        storage.delete_dir(lay.user_embeddings("student-full"))
