"""Serve a trained recommender run (``slim_ray.rec``: ``rec/<backbone>-<mode>[-<role>]-s<seed>/``).

``CheckpointScorer`` rebuilds the run with rec's own ``SeqRec`` and ``meta.json`` (the weights
load with ``torch.load(weights_only=True)``, never a pickle of arbitrary objects; text
vectors are buffers inside model.pt, so the folder is self-contained) and scores histories exactly
as the model does at evaluation (``SeqRec.last_user_vectors`` + ``item_table``), with one addition
for serving: the rationale vector may come from the request (a fresh student rationale encoded by
the encoder deployment) instead of the model's table of known users.

The run folder may be on storage (``s3://...``): it is fetched once per node into the local cache
(``storage.local_copy``, keyed by content) and memory-mapped from there (``_load_run``), so the
per-user rationale table inside model.pt costs a replica only the rows it reads.

Which run: ``serve.checkpoint`` (a run folder or URI, or a run name under ``<run_dir>/rec/``), else
the finished run with the best *validation* NDCG@10 (``meta.json``), never chosen on test metrics.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from slim_ray import storage


def _is_run(path: str) -> bool:
    try:
        from slim_ray.rec.checkpoint import is_finished
    except ImportError:
        return storage.is_file(storage.join(path, "meta.json")) and storage.is_file(storage.join(path, "model.pt"))
    return is_finished(path)


def finished_runs(rec_dir: str) -> list[str]:
    try:
        from slim_ray.rec.checkpoint import finished_runs as rec_finished_runs
    except ImportError:
        rec_finished_runs = None
    if rec_finished_runs is not None:
        return rec_finished_runs(rec_dir)
    if not storage.is_dir(rec_dir):
        return []
    fs, root = storage.resolve(rec_dir)
    names = [i.base_name for i in fs.get_file_info(storage.pafs.FileSelector(root))
             if i.type == storage.pafs.FileType.Directory]
    return sorted(storage.join(rec_dir, n) for n in names if _is_run(storage.join(rec_dir, n)))


def resolve_run(cfg, chosen: Optional[str]) -> str:
    """The run folder to serve (see module doc). FileNotFoundError when there is none."""
    if chosen:
        path = chosen if storage.is_dir(chosen) else storage.join(cfg.layout.rec, chosen)
        if not _is_run(path):
            raise FileNotFoundError(f"serve.checkpoint={chosen!r}: {path} has no finished run (meta.json + model.pt)")
        return path
    runs = finished_runs(cfg.layout.rec)
    if not runs:
        raise FileNotFoundError(f"no finished recommender run under {cfg.layout.rec} (run `slim-ray train`)")

    def valid_ndcg(run: str) -> float:
        return float((storage.read_json(storage.join(run, "meta.json")) or {}).get("best_valid_ndcg@10") or -1.0)

    return max(runs, key=lambda r: (valid_ndcg(r), r))


def find_run(cfg) -> str:
    return resolve_run(cfg, cfg.serve.checkpoint)


def _load_run(local_dir: str):
    """(model in eval mode, meta) of a local run folder, with the weights memory-mapped.

    Like ``slim_ray.rec.checkpoint.load_run`` (``weights_only=True``), but ``model.pt`` is mapped
    (``torch.load(mmap=True)``) and its tensors become the model's own (``assign=True``): the
    per-user rationale table (``user_text``, [n_users + 1, D], 1.5 GB at a million users and 384
    dims) is never copied into the replica's memory; the rows a request reads are paged in from
    the file, shared by the replicas of a node through the page cache."""
    import torch

    from slim_ray.rec.checkpoint import MODEL, read_meta
    from slim_ray.rec.fusion import SeqRec

    meta = read_meta(local_dir)
    if meta is None:
        raise FileNotFoundError(f"{local_dir}: no meta.json (not a finished recommender run)")
    state = torch.load(os.path.join(local_dir, MODEL), map_location="cpu", weights_only=True, mmap=True)
    model = SeqRec(meta["backbone"], meta["mode"], meta["hp"], meta["n_items"], state.get("item_text"),
                   state.get("user_text"), state.get("user_has_text"),
                   learned_no_rationale="no_rationale" in state)
    model.load_state_dict(state, assign=True)
    model.eval()
    return model, meta



class CheckpointScorer:
    """A trained SeqRec run behind the ``Scorer`` interface of ``slim_ray.serve.recommender``."""

    def __init__(self, run_dir: str, threads: Optional[int] = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        local = storage.local_copy(run_dir)
        self.model, self.meta = _load_run(local)
        self.run_dir = run_dir
        m = self.meta
        self.run_name = storage.basename(run_dir.rstrip("/"))
        self.name = f"checkpoint:{self.run_name}"
        #: content hash of the weights: the version a response reports
        self.sha256 = storage.sha256_file(os.path.join(local, "model.pt"))
        self.max_len = int(m["hp"]["max_len"])
        self.n_items = int(m["n_items"])
        with torch.no_grad():
            self.table = self.model.item_table().detach()
        self.text_dim = int(self.model.g_l.in_features) if hasattr(self.model, "g_l") else None

    @property
    def uses_rationales(self) -> bool:
        return bool(self.model.uses_rationales)

    @property
    def version(self) -> dict:
        return {"checkpoint": self.run_name, "sha256": self.sha256, "uri": self.run_dir,
                "backbone": self.meta.get("backbone"), "variant": self.meta.get("variant"),
                "role": self.meta.get("role")}

    def stored_user_vector(self, user_id: int) -> Optional[np.ndarray]:
        """The rationale vector the model was trained with for a known user (None: has none)."""
        if not self.uses_rationales:
            return None
        has = self.model.user_has_text
        if not (0 < user_id < len(has)) or not bool(has[user_id]):
            return None
        return self.model.user_text[user_id].numpy().copy()

    def scores(self, history: Sequence[int], user_vec: Optional[np.ndarray]) -> np.ndarray:
        return self.scores_many([history], [user_vec])[0]

    def scores_many(self, histories: Sequence[Sequence[int]],
                    user_vecs: Sequence[Optional[np.ndarray]]) -> np.ndarray:
        """[B, n_items + 1] scores of B histories in one forward pass (what a served batch runs)."""
        torch = self.torch
        from slim_ray.rec.data import pad_right

        rows = []
        for history in histories:
            hist = [i for i in history if 0 < i <= self.n_items]
            if not hist:
                raise ValueError(f"{self.name}: the history has no item the model knows (ids 1..{self.n_items})")
            rows.append(np.asarray(hist, dtype=np.int64))
        seq, lens = pad_right(rows, self.max_len)
        seq_t, lens_t = torch.from_numpy(seq), torch.from_numpy(lens)
        model = self.model
        with torch.no_grad():
            emb = self.table[seq_t] * (seq_t > 0)[..., None].to(self.table.dtype)
            h = model.backbone(emb, seq_t, lens_t)
            if h.dim() == 3:
                h = h[torch.arange(len(rows)), lens_t - 1]
            if model.uses_rationales:
                r = torch.stack([self._rationale(v) for v in user_vecs])
                h = model.g_f(torch.cat([r, h], -1))
            s = (h @ self.table.T).numpy().astype(np.float64)
        s[:, 0] = -np.inf
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


def load_checkpoint_scorer(cfg, checkpoint: Optional[str] = None) -> CheckpointScorer:
    run = resolve_run(cfg, checkpoint if checkpoint is not None else cfg.serve.checkpoint)
    return CheckpointScorer(run, threads=max(1, int(round(cfg.serve.recommender_scaling.num_cpus))))
