"""Serve a trained recommender run (``slim_ray.rec``: ``rec/<backbone>-<mode>[-<role>]-s<seed>/``).

``CheckpointScorer`` rebuilds the run with ``slim_ray.rec.train.load_run`` (model.pt + meta.json;
text vectors are buffers inside model.pt, so the folder is self-contained) and scores one history
exactly as the model does at evaluation (``SeqRec.last_user_vectors`` + ``item_table``), with one
addition for serving: the rationale vector may come from the request (a fresh student rationale
encoded by the encoder deployment) instead of the model's table of known users.

Which run: ``serve.checkpoint`` (a run folder, or a run name under ``<run_dir>/rec/``), else the
finished run with the best *validation* NDCG@10 (``meta.json``), never chosen on test metrics.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np


def finished_runs(rec_dir: str) -> list[str]:
    if not os.path.isdir(rec_dir):
        return []
    return sorted(
        os.path.join(rec_dir, d) for d in os.listdir(rec_dir)
        if os.path.isfile(os.path.join(rec_dir, d, "meta.json")) and os.path.isfile(os.path.join(rec_dir, d, "model.pt"))
    )


def find_run(cfg) -> str:
    """The run folder to serve (see module doc). FileNotFoundError when there is none."""
    chosen = cfg.serve.checkpoint
    if chosen:
        path = chosen if os.path.isdir(chosen) else os.path.join(cfg.layout.rec, chosen)
        if not (os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, "model.pt"))):
            raise FileNotFoundError(f"serve.checkpoint={chosen!r}: {path} has no finished run (meta.json + model.pt)")
        return path
    runs = finished_runs(cfg.layout.rec)
    if not runs:
        raise FileNotFoundError(f"no finished recommender run under {cfg.layout.rec} (run `slim-ray train`)")

    def valid_ndcg(run: str) -> float:
        with open(os.path.join(run, "meta.json")) as f:
            return float(json.load(f).get("best_valid_ndcg@10") or -1.0)

    return max(runs, key=lambda r: (valid_ndcg(r), r))


class CheckpointScorer:
    """A trained SeqRec run behind the ``Scorer`` interface of ``slim_ray.serve.recommender``."""

    def __init__(self, run_dir: str, threads: Optional[int] = None):
        import torch

        from slim_ray.rec.train import load_run

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model, self.meta = load_run(run_dir)
        self.run_dir = run_dir
        m = self.meta
        self.name = f"checkpoint:{os.path.basename(run_dir.rstrip('/'))}"
        self.max_len = int(m["hp"]["max_len"])
        self.n_items = int(m["n_items"])
        with torch.no_grad():
            self.table = self.model.item_table().detach()
        self.text_dim = int(self.model.g_l.in_features) if hasattr(self.model, "g_l") else None

    @property
    def uses_rationales(self) -> bool:
        return bool(self.model.uses_rationales)

    def stored_user_vector(self, user_id: int) -> Optional[np.ndarray]:
        """The rationale vector the model was trained with for a known user (None: has none)."""
        if not self.uses_rationales:
            return None
        has = self.model.user_has_text
        if not (0 < user_id < len(has)) or not bool(has[user_id]):
            return None
        return self.model.user_text[user_id].numpy().copy()

    def scores(self, history: Sequence[int], user_vec: Optional[np.ndarray]) -> np.ndarray:
        torch = self.torch
        from slim_ray.rec.data import pad_right

        hist = [i for i in history if 0 < i <= self.n_items]
        if not hist:
            raise ValueError(f"{self.name}: the history has no item the model knows (ids 1..{self.n_items})")
        seq, lens = pad_right([np.asarray(hist, dtype=np.int64)], self.max_len)
        seq_t, lens_t = torch.from_numpy(seq), torch.from_numpy(lens)
        model = self.model
        with torch.no_grad():
            emb = self.table[seq_t] * (seq_t > 0)[..., None].to(self.table.dtype)
            h = model.backbone(emb, seq_t, lens_t)
            if h.dim() == 3:
                h = h[torch.arange(1), lens_t - 1]
            if model.uses_rationales:
                h = model.g_f(torch.cat([self._rationale(user_vec)[None], h], -1))
            s = (h @ self.table.T)[0].numpy().astype(np.float64)
        s[0] = -np.inf
        return s

    def _rationale(self, user_vec: Optional[np.ndarray]):
        """g_l of the request's rationale vector; without one, the run's own fallback (learned
        'no rationale' vector, else zeros) -- as in training for users without a rationale."""
        torch, model = self.torch, self.model
        if user_vec is not None:
            v = torch.as_tensor(np.asarray(user_vec, dtype=np.float32))
            if v.shape[-1] != self.text_dim:
                raise ValueError(f"{self.name}: rationale vector has {v.shape[-1]} dims, the model was trained "
                                 f"on {self.text_dim} (serve with the encoder the run was trained with)")
        elif getattr(model, "no_rationale", None) is not None:
            v = model.no_rationale.detach()
        else:
            v = torch.zeros(self.text_dim)
        return model.g_l(v)


def load_checkpoint_scorer(cfg) -> CheckpointScorer:
    return CheckpointScorer(find_run(cfg), threads=max(1, int(round(cfg.serve.recommender_scaling.num_cpus))))
