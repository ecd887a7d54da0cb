"""Leave-one-out in one place (slim_ray/data/splits.py), and every stage cutting through it."""

from __future__ import annotations

import numpy as np
import pytest

from slim_ray.data import splits


def test_leave_one_out_by_hand():
    s = [11, 12, 13, 14, 15]
    assert splits.training_prefix(s) == [11, 12, 13]
    assert splits.split_history(s, "valid") == ([11, 12, 13], 14)
    assert splits.split_history(s, "test") == ([11, 12, 13, 14], 15)
    assert splits.leave_one_out(s) == ([11, 12, 13], 14, 15)
    assert splits.training_length(5) == 3 and splits.training_length(1) == 0
    assert list(splits.training_prefix(np.array([1, 2]))) == []
    with pytest.raises(ValueError, match=">= 3"):
        splits.leave_one_out([1, 2])
    with pytest.raises(ValueError, match="unknown split"):
        splits.split_history(s, "train")


def test_prompts_and_rec_cut_through_splits():
    """The prompt's training prefix and the recommender's splits are the same cut."""
    from slim_ray.prompts.builder import training_prefix
    from slim_ray.rec.data import RecData, eval_split

    s = list(range(1, 11))
    assert training_prefix(s) == splits.training_prefix(s)
    assert training_prefix(s, cut="consistent") == s[:5]  # L=8: min(8-3, floor(6.4)) = 5
    data = RecData(user_ids=np.array([7]), seqs=[np.array(s)], n_items=10, n_users=7)
    for split, (hist, target) in (("valid", (s[:-2], 9)), ("test", (s[:-1], 10))):
        ev = eval_split(data, split, max_len=20)
        assert int(ev.targets[0]) == target and int(ev.lens[0]) == len(hist)
