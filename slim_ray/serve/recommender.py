"""What the recommender deployment computes, as plain Python (no Ray): the catalogue of a run,
and scorers with one interface:

    scorer.scores(history: list[int], user_vec: np.ndarray | None) -> np.ndarray [max_item_id + 1]

(index = item id, index 0 is padding), and ``top_k(scores, exclude=history, k)`` -> [(item_id,
score)], never recommending an item of the history.

Scorers:
- ``TextMatchScorer`` -- the ID-agnostic text matching of SLIM without a trained projection:
  cosine between the user's vector (the encoded rationale, or the mean of the history's item
  vectors when there is no rationale) and every item vector. Needs only the encode stage's
  output, so it serves users and items no ID model has seen.
- a trained checkpoint from ``slim_ray.rec`` (see ``load_scorer``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np

from slim_ray.data.io import read_items, read_sequences
from slim_ray.encode.store import load_embeddings

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    name: str

    def scores(self, history: Sequence[int], user_vec: Optional[np.ndarray]) -> np.ndarray: ...


def top_k(scores: np.ndarray, exclude: Sequence[int], k: int) -> list[tuple[int, float]]:
    """The k best item ids by score, best first, skipping padding (0) and ``exclude``."""
    s = np.array(scores, dtype=np.float64, copy=True)
    s[0] = -np.inf
    ex = np.asarray([i for i in exclude if 0 <= i < len(s)], dtype=np.int64)
    s[ex] = -np.inf
    valid = int(np.isfinite(s).sum())
    k = min(k, valid)
    if k <= 0:
        return []
    idx = np.argpartition(-s, k - 1)[:k]
    idx = idx[np.lexsort((idx, -s[idx]))]  # score desc, then id asc: deterministic
    return [(int(i), float(s[i])) for i in idx]


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class TextMatchScorer:
    """Cosine between a user vector and every item vector (see module doc)."""

    name = "text-match"
    uses_rationales = True

    def __init__(self, item_ids: np.ndarray, item_vecs: np.ndarray, n_items: Optional[int] = None):
        n = int(max(int(item_ids.max()), n_items or 0)) + 1
        self.matrix = np.zeros((n, item_vecs.shape[1]), dtype=np.float32)
        self.matrix[item_ids] = item_vecs
        self.known = np.zeros(n, dtype=bool)
        self.known[item_ids] = True

    def user_vector(self, history: Sequence[int], user_vec: Optional[np.ndarray]) -> np.ndarray:
        if user_vec is not None:
            return _unit(np.asarray(user_vec, dtype=np.float32))
        hist = [i for i in history if 0 < i < len(self.known) and self.known[i]]
        if not hist:
            raise ValueError("text matching needs a rationale vector or a history of known items")
        return _unit(self.matrix[hist].mean(axis=0))

    def scores(self, history: Sequence[int], user_vec: Optional[np.ndarray]) -> np.ndarray:
        s = self.matrix @ self.user_vector(history, user_vec)
        s[~self.known] = -np.inf
        return s


@dataclass
class Catalog:
    """Items (id -> title), known users' histories and stored rationale vectors of one run."""

    titles: dict[int, str]
    texts: dict[int, str]
    histories: dict[int, list[int]] = field(default_factory=dict)
    user_vectors: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(cls, layout, user_role: str = "student") -> "Catalog":
        items = read_items(layout.items, columns=["item_id", "title", "text"])
        ids = items.column("item_id").to_pylist()
        cat = cls(dict(zip(ids, items.column("title").to_pylist())),
                  dict(zip(ids, items.column("text").to_pylist())))
        if os.path.exists(layout.sequences):
            seq = read_sequences(layout.sequences, columns=["user_id", "item_ids"])
            cat.histories = dict(zip(seq.column("user_id").to_pylist(), seq.column("item_ids").to_pylist()))
        if user_role != "none" and os.path.isdir(layout.user_embeddings(user_role)):
            try:
                uids, uvecs = load_embeddings(layout.user_embeddings(user_role), kind="user")
                cat.user_vectors = dict(zip(uids.tolist(), uvecs))
            except FileNotFoundError:
                pass
        return cat

    def unknown_items(self, history: Sequence[int]) -> list[int]:
        return [i for i in history if i not in self.titles]


def load_scorer(cfg) -> Scorer:
    """The scorer ``serve.recommender`` asks for (see ServeConfig)."""
    s = cfg.serve
    if s.recommender in ("auto", "checkpoint"):
        try:
            from slim_ray.serve.checkpoint import load_checkpoint_scorer

            scorer = load_checkpoint_scorer(cfg)
        except (ImportError, FileNotFoundError) as e:
            if s.recommender == "checkpoint":
                raise FileNotFoundError(f"serve.recommender=checkpoint but no checkpoint could be loaded: {e}") from e
            logger.warning("no trained recommender (%s); serving text matching", e)
            scorer = None
        if scorer is not None:
            return scorer
    ids, vecs = load_embeddings(cfg.layout.item_embeddings, kind="item")
    return TextMatchScorer(ids, vecs)
