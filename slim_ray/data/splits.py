"""Leave-one-out, in one place: every stage cuts a user's time-ordered sequence here.

For a sequence ``s`` (oldest first): the training prefix is ``s[:-2]``, the validation target
``s[-2]`` (history ``s[:-2]``), the test target ``s[-1]`` (history ``s[:-1]``). A rationale may see
at most the training prefix (the leakage guard), and under the time-consistent protocol only its
first ``prompts.cut_length`` items.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

S = TypeVar("S", bound=Sequence)

#: Items at the end of every sequence that training never sees: the validation and test targets.
HELD_OUT = 2
SPLITS = ("valid", "test")


def training_length(n_items: int) -> int:
    """Length of the training prefix of a sequence of ``n_items`` items."""
    return max(0, n_items - HELD_OUT)


def training_prefix(seq: S) -> S:
    """``seq[:-2]``: what training and rationales may see (empty for a sequence of <= 2 items)."""
    return seq[:training_length(len(seq))]


def split_history(seq: S, split: str) -> tuple[S, object]:
    """(history, target) of the ``valid`` or ``test`` split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected valid or test)")
    cut = -2 if split == "valid" else -1
    return seq[:cut], seq[cut]


def leave_one_out(seq: S) -> tuple[S, object, object]:
    """(training prefix, validation target, test target); needs at least 3 items."""
    if len(seq) < HELD_OUT + 1:
        raise ValueError(f"leave-one-out needs >= 3 interactions, got {len(seq)}")
    return training_prefix(seq), seq[-2], seq[-1]
