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
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np

from slim_ray import storage
from slim_ray.encode.store import load_embeddings
from slim_ray.data import userstate
from slim_ray.data.userstate import UserState

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
    """Items (id -> key, title, text) and the per-user state of one run.

    The items are small dicts (one entry per item); everything per user (histories, stored
    rationale vectors and texts) is a memory-mapped ``UserState`` (``slim_ray.data.userstate``),
    shared by the replicas of a node through the page cache. ``histories``, ``user_vectors`` and
    ``rationales`` are read-only mappings over it."""

    titles: dict[int, str]
    texts: dict[int, str]
    keys: dict[int, str] = field(default_factory=dict)
    users: UserState = field(default_factory=UserState.empty)

    @classmethod
    def load(cls, layout, user_role: str = "student", user_vectors: bool = True) -> "Catalog":
        """``user_vectors=False``: the state leaves the stored vectors out (a scorer that keeps
        the ones it was trained with, see ``Recommender``)."""
        items = storage.read_table(layout.items, columns=["item_id", "item_key", "title", "text"])
        if items is None:
            raise FileNotFoundError(f"{layout.items}: no items (run `slim-ray prepare` first)")
        ids = items.column("item_id").to_pylist()
        return cls(dict(zip(ids, items.column("title").to_pylist())),
                   dict(zip(ids, items.column("text").to_pylist())),
                   dict(zip(ids, items.column("item_key").to_pylist())),
                   userstate.ensure(layout, user_role, vectors=user_vectors))

    @property
    def histories(self):
        return self.users.histories

    @property
    def user_vectors(self):
        return self.users.user_vectors

    @property
    def rationales(self):
        return self.users.rationales

    def unknown_items(self, history: Sequence[int]) -> list[int]:
        return [i for i in history if i not in self.titles]


def load_scorer(cfg, checkpoint: Optional[str] = None) -> Scorer:
    """The scorer ``serve.recommender`` asks for (see ServeConfig); ``checkpoint`` overrides
    ``serve.checkpoint`` (a model swap while serving)."""
    s = cfg.serve
    if s.recommender in ("auto", "checkpoint"):
        try:
            from slim_ray.serve.checkpoint import load_checkpoint_scorer

            scorer = load_checkpoint_scorer(cfg, checkpoint)
        except (ImportError, FileNotFoundError) as e:
            if s.recommender == "checkpoint" or checkpoint:
                raise FileNotFoundError(f"serve.recommender=checkpoint but no checkpoint could be loaded: {e}") from e
            logger.warning("no trained recommender (%s); serving text matching", e)
            scorer = None
        if scorer is not None:
            return scorer
    ids, vecs = load_embeddings(cfg.layout.item_embeddings, kind="item")
    return TextMatchScorer(ids, vecs)


def user_state_spec(cfg, checkpoint: Optional[str] = None) -> tuple[str, bool]:
    """(role, vectors) of the per-user state ``Recommender`` opens for this config, read from the
    chosen run's meta.json without loading a model: a checkpoint brings its own rationale vectors
    (its role's), text matching reads them from the state (``serve.user_embeddings``)."""
    s, role = cfg.serve, cfg.serve.user_embeddings
    if s.recommender in ("auto", "checkpoint"):
        from slim_ray.serve.checkpoint import resolve_run

        try:
            run = resolve_run(cfg, checkpoint if checkpoint is not None else s.checkpoint)
        except FileNotFoundError:
            run = None
        if run is not None:
            meta = storage.read_json(storage.join(run, "meta.json")) or {}
            if role != "none" and meta.get("role") in ("student", "teacher"):
                role = meta["role"]
            return role, False
    return role, True


class RequestError(Exception):
    """A client error: HTTP status, the request field at fault, and a message naming it."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def as_dict(self) -> dict:
        return {"status": self.status, "field": self.field, "message": self.message}


class Recommender:
    """Everything the recommender deployment does for a batch of requests, without Ray.

    One request is a dict ``{user_id, history, k, vector, path, explain, student}``: ``vector`` is
    a rationale vector the ingress already has (``path`` says where it came from), ``student`` says
    whether the ingress could ask the student for a rationale. ``answer_many`` resolves known users,
    validates item ids, scores every request that is ready in ONE forward pass and returns, per
    request, one of ``{"items", "path", "rationale", "version"}``, ``{"need_rationale": True,
    "history"}`` (ask the student, then call again with its vector) or ``{"error": {...}}``.
    """

    def __init__(self, cfg, checkpoint: Optional[str] = None, catalog: Optional[Catalog] = None):
        self.cfg = cfg
        self.scorer = load_scorer(cfg, checkpoint)
        role = cfg.serve.user_embeddings
        meta = getattr(self.scorer, "meta", None) or {}
        if role != "none" and meta.get("role") in ("student", "teacher"):
            role = meta["role"]  # the rationales the checkpoint was trained with
        # A scorer with its own table of stored vectors (a checkpoint) needs none in the state.
        own = getattr(self.scorer, "stored_user_vector", None) is not None
        self.catalog = catalog or Catalog.load(cfg.layout, role, user_vectors=not own)
        self.data_snapshot = _data_snapshot(cfg.layout)

    @property
    def uses_rationales(self) -> bool:
        return bool(getattr(self.scorer, "uses_rationales", True))

    @property
    def version(self) -> dict:
        v = getattr(self.scorer, "version", None) or {"checkpoint": None, "sha256": None, "scorer": self.scorer.name}
        return {**v, "scorer": self.scorer.name, "data_snapshot": self.data_snapshot}

    def _stored_vector(self, user_id: int) -> Optional[np.ndarray]:
        stored = getattr(self.scorer, "stored_user_vector", None)
        return stored(user_id) if stored is not None else self.catalog.users.vector(user_id)

    def plan(self, req: dict) -> dict:
        """Resolve one request: its history, vector and path, or what is missing (no scoring)."""
        cat, user_id, history = self.catalog, req.get("user_id"), req.get("history")
        stored_history = cat.users.history(user_id) if user_id is not None else None
        known = stored_history is not None
        if user_id is not None and not known and history is None:
            raise RequestError(404, "user_id", f"user_id: unknown user {user_id}; send its history instead")
        if history is None:
            history = stored_history or []
        if not history:
            raise RequestError(422, "history", "history: give a user_id of the run or a non-empty list of item ids")
        unknown = cat.unknown_items(history)
        if unknown:
            raise RequestError(422, "history", f"history: unknown item ids {unknown[:10]}")
        vec, path, rationale = req.get("vector"), req.get("path") or "history", req.get("rationale")
        if not self.uses_rationales:  # an id / id_text run: the history alone makes the user vector
            vec, path = None, "history"
        elif vec is None:
            stored = self._stored_vector(user_id) if known and req.get("history") is None else None
            if stored is not None:
                vec, path = stored, "stored-rationale"
                rationale = cat.users.rationale(user_id) if req.get("explain") else None
            elif req.get("student") and (req.get("explain") or not known):
                # a raw history, or a known user without a stored rationale who asked for one
                return {"need_rationale": True, "history": history}
            else:
                path = "no-rationale"  # the run's learned "no rationale" vector
        return {"history": history, "vector": vec, "path": path, "rationale": rationale}

    def answer_many(self, reqs: list[dict]) -> list[dict]:
        out: list[Optional[dict]] = [None] * len(reqs)
        ready: list[tuple[int, dict, dict]] = []
        for n, req in enumerate(reqs):
            try:
                p = self.plan(req)
            except RequestError as e:
                out[n] = {"error": e.as_dict()}
                continue
            if p.get("need_rationale"):
                out[n] = p
            else:
                ready.append((n, req, p))
        if ready:
            scorer, version = self.scorer, self.version  # one model for the whole batch, even mid-swap
            many = getattr(scorer, "scores_many", None)
            try:
                if many is not None:
                    rows = many([p["history"] for _, _, p in ready], [p["vector"] for _, _, p in ready])
                else:
                    rows = [scorer.scores(p["history"], p["vector"]) for _, _, p in ready]
            except ValueError as e:  # e.g. a rationale vector of the wrong width
                for n, _, _ in ready:
                    out[n] = {"error": {"status": 422, "field": "rationale", "message": str(e)}}
                return out
            for (n, req, p), s in zip(ready, rows):
                out[n] = {"items": self.items(top_k(s, p["history"], req["k"])), "path": p["path"],
                          "rationale": p["rationale"], "history_len": len(p["history"]), "version": version}
        return out

    def items(self, ranked: list[tuple[int, float]]) -> list[dict]:
        cat = self.catalog
        return [{"id": i, "key": cat.keys.get(i), "title": cat.titles.get(i), "score": round(s, 6)}
                for i, s in ranked]

    def probe(self) -> None:
        """Health probe: the model is loaded and scores a one-item history to finite numbers."""
        item = next(iter(self.catalog.titles))
        s = self.scorer.scores([item], None)
        if not np.isfinite(s[1:]).any():
            raise RuntimeError(f"{self.scorer.name}: the probe scored no item")


def _data_snapshot(layout) -> Optional[str]:
    """The prepared data's identity: its stage fingerprint (manifest), else a listing hash."""
    from slim_ray.lineage import fingerprint_path

    try:
        return fingerprint_path(layout.prepared)
    except (FileNotFoundError, OSError):
        return None
