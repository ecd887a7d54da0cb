"""The rationale protocol: a rationale written from item_ids[:c] never informs a target at t < c."""

import numpy as np
import pytest
import torch

from rec_testdata import cyclic_sequences, tail_cuts, write_rationales
from slim_ray.rec import data as rd
from slim_ray.rec.fusion import SeqRec
from slim_ray.rec.config import backbone_defaults


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """20 users (8-16 items), rationales of users 1..15 cut 3 items before the end of the training
    prefix; users 16..20 have none."""
    root = str(tmp_path_factory.mktemp("leak"))
    seqs = cyclic_sequences(20, 30, 8, 16, seed=3)
    data = rd.RecData(np.arange(1, 21), [np.asarray(s, dtype=np.int64) for s in seqs], 30, 20)
    folder = f"{root}/rationales/student"
    write_rationales(folder, np.arange(1, 16), tail_cuts(seqs[:15]), "student")
    return data, rd.rationale_cuts(folder, data), seqs


def _check_positions(ex, data, cuts):
    """(positions that see a rationale written past their target, positions before a cut)"""
    seqs = {int(u): s for u, s in zip(data.user_ids, data.seqs)}
    leaks = before_cut = 0
    for m in range(len(ex)):
        u, c = int(ex.users[m]), int(cuts[ex.users[m]])
        for j in np.flatnonzero(ex.targets[m] > 0):
            t = int(ex.target_pos[m, j])
            assert seqs[u][t] == ex.targets[m, j] and t <= len(seqs[u]) - 3  # the index of a training target
            before_cut += t < c
            leaks += bool(ex.rationale_mask[m, j]) and c > t
    return leaks, before_cut


def test_cuts_are_joined_from_the_rationales_contract(built):
    data, cuts, seqs = built
    assert cuts.shape == (21,) and cuts[0] == 0 and (cuts[16:] == 0).all()
    assert cuts[1:16].tolist() == [len(s) - 5 for s in seqs[:15]]  # 3 training targets after the cut


@pytest.mark.parametrize("kind", ["windows", "prefixes"])
def test_no_position_before_the_cut_sees_the_rationale_and_leaky_does(built, kind):
    data, cuts, _ = built

    def build(protocol):
        if kind == "windows":  # max_len 4: several windows per user, so cuts fall inside and between them
            return rd.window_examples(data, 4, cuts, protocol)
        return rd.prefix_examples(data, 4, None, np.random.default_rng(0), cuts, protocol)

    consistent = build("consistent")
    leaks, before_cut = _check_positions(consistent, data, cuts)
    assert before_cut > 50 and leaks == 0
    # ... and the positions after the cut do see it (3 per user with a rationale, 15 users)
    seen = sum(int(consistent.rationale_mask[m][consistent.targets[m] > 0].sum())
               for m in range(len(consistent)) if cuts[consistent.users[m]] > 0)
    assert seen == 15 * 3
    leaky = build("leaky")
    leaks, _ = _check_positions(leaky, data, cuts)
    assert leaks == before_cut > 50  # the leaky protocol fuses it into every one of those positions


def test_a_rationale_past_the_training_prefix_is_refused(tmp_path, built):
    data, _, seqs = built
    write_rationales(str(tmp_path / "r"), [2, 5], [len(seqs[1]) - 2, len(seqs[4]) - 1], "student")
    with pytest.raises(ValueError, match=r"1 users have a rationale written past their training prefix.*\[5\]"):
        rd.rationale_cuts(str(tmp_path / "r"), data)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_masked_positions_do_not_depend_on_the_rationale(backbone):
    """The fused user vector before the cut is the same whatever the rationale says; after it, not."""
    torch.manual_seed(0)
    hp = {**backbone_defaults(backbone), "hidden": 16, "max_len": 6, "dropout": 0.0}
    n_items, D = 20, 8
    model = SeqRec(backbone, "slim", hp, n_items, torch.randn(n_items + 1, D), torch.zeros(3, D),
                   torch.ones(3, dtype=torch.bool), learned_no_rationale=True).eval()
    seq, lens = torch.tensor([[3, 4, 5, 6, 7, 8]]), torch.tensor([6])
    mask = torch.tensor([[False, False, False, True, True, True]])
    table = model.item_table()
    with torch.no_grad():
        a = model.user_vectors(seq, lens, None, table, torch.randn(1, D), None, mask)
        b = model.user_vectors(seq, lens, None, table, torch.randn(1, D), None, mask)
    assert torch.allclose(a[0, :3], b[0, :3])
    assert (a[0, 3:] - b[0, 3:]).abs().min() > 1e-4
