"""A finished recommender run folder: ``rec/<backbone>-<mode>[-<role>]-s<seed>/``.

The one place that knows what a finished run is and how to load it, so evaluation, serving and
the training sweep share it without importing the training code:

    model.pt    best weights + the frozen text tables (item text vectors, rationale vectors), so
                the folder is self-contained; loaded with ``torch.load(weights_only=True)``
    meta.json   settings, fingerprint, training log; written last, it is the commit marker

The run folder may be a local path or a storage URI (``s3://...``): every byte goes through
``slim_ray.storage``, and loading fetches the folder once per node into the local cache.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from slim_ray import storage

MODEL = "model.pt"
META = "meta.json"


def read_meta(run_dir: str) -> Optional[dict[str, Any]]:
    """The run's meta.json, or None when it is missing or unreadable."""
    return storage.read_json(storage.join(run_dir, META))


def is_finished(run_dir: str, fingerprint: Optional[str] = None) -> bool:
    """True when ``run_dir`` holds a finished run (meta.json and model.pt), with ``fingerprint``
    when one is given (same settings: the run need not be trained again)."""
    meta = read_meta(run_dir)
    if meta is None or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
        return False
    return storage.is_file(storage.join(run_dir, MODEL))


def finished_runs(rec_dir: str) -> list[str]:
    """Sorted folders (paths or URIs) of the finished runs directly under ``rec_dir``."""
    root = storage.normalize(rec_dir)
    runs = set()
    for f in storage.list_files(root, suffix=META, recursive=True):
        rel = f[len(root):].strip("/").replace(os.sep, "/").split("/")
        if len(rel) == 2 and rel[1] == META:
            runs.add(storage.join(root, rel[0]))
    return sorted(r for r in runs if is_finished(r))


def write_run(run_dir: str, state: dict, meta: dict[str, Any]) -> None:
    """Publish a run: model.pt first, meta.json (the commit marker) last, each as one whole object."""
    import tempfile

    import torch

    storage.makedirs(run_dir)
    with tempfile.TemporaryDirectory(prefix="slim-ray-model-") as d:  # streamed: 1.5 GB of rationale vectors at 1M users
        local = os.path.join(d, MODEL)
        torch.save(state, local)
        storage.write_file(local, storage.join(run_dir, MODEL))
    storage.write_json(storage.join(run_dir, META), meta)


def load_state(run_dir: str, map_location: str = "cpu") -> dict:
    """The tensors of model.pt (tensors and plain data only: ``weights_only=True``)."""
    import torch

    local = storage.local_copy(run_dir)
    return torch.load(os.path.join(local, MODEL), map_location=map_location, weights_only=True)


def load_run(run_dir: str, map_location: str = "cpu"):
    """(model in eval mode, meta) of a finished run folder, rebuilt without the embeddings folders
    (the text vectors are stored inside model.pt)."""
    from slim_ray.rec.fusion import SeqRec

    meta = read_meta(run_dir)
    if meta is None:
        raise FileNotFoundError(f"{run_dir}: no {META} (not a finished recommender run)")
    state = load_state(run_dir, map_location)
    model = SeqRec(meta["backbone"], meta["mode"], meta["hp"], meta["n_items"], state.get("item_text"),
                   state.get("user_text"), state.get("user_has_text"),
                   learned_no_rationale="no_rationale" in state)
    model.load_state_dict(state)
    model.eval()
    return model, meta
