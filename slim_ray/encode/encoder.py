"""The text encoder: plain functions (usable without Ray, e.g. by the serving graph) and the
Ray Data actor that wraps them.

    encode_texts(texts, "all-minilm-l6-v2", batch_size=64) -> np.ndarray [n, dim] float32

Vectors are L2-normalised by default (``normalize=True``), so a dot product is a cosine
similarity; all-MiniLM-L6-v2 ends in a Normalize module anyway, the flag makes it hold for any
sentence-transformers folder. Output is float32 whatever the weights' precision.

A loaded encoder is cached per process (path, device, dtype, max_seq_length), so an actor or a
Serve replica loads it once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from slim_ray import assets


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def load_encoder(path: str, device: str = "cpu", dtype: str = "float32", max_seq_length: Optional[int] = None):
    """Load a sentence-transformers folder once per process (no hub access)."""
    import torch
    from sentence_transformers import SentenceTransformer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"encoder folder {path} does not exist")
    model = SentenceTransformer(path, device=device, local_files_only=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


def embedding_dim(model) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def encode_texts(
    texts: Sequence[str],
    encoder: str = "all-minilm-l6-v2",
    batch_size: int = 64,
    *,
    dtype: str = "float32",
    normalize: bool = True,
    device: str = "auto",
    max_seq_length: Optional[int] = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Embed ``texts`` with a packaged encoder name or a local folder -> float32 [len(texts), dim]."""
    import torch

    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode_texts: text #{i} is {type(t).__name__}, expected str")
    model = load_encoder(assets.resolve_encoder(encoder), pick_device(device), dtype, max_seq_length)
    if not texts:
        return np.zeros((0, embedding_dim(model)), dtype=np.float32)
    with torch.inference_mode():
        vecs = model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
    vecs = np.asarray(vecs, dtype=np.float32)
    if normalize:  # in float32: a bf16 model's own Normalize module is only ~0.3% accurate
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    return vecs


# --------------------------------------------------------------------------- identity / resume keys


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that changes a vector. ``fingerprint`` enters every row's ``encode_key``."""

    name: str  # as configured
    path: str  # resolved folder
    model_id: str  # written to the contract's `encoder` column
    dtype: str
    normalize: bool
    max_seq_length: Optional[int]
    fingerprint: str

    @classmethod
    def from_config(cls, cfg) -> "EncoderSpec":
        path = assets.resolve_encoder(cfg.encoder)
        weights = _folder_digest(path)
        fp = hashlib.sha256(
            "\0".join([weights, cfg.dtype, str(cfg.normalize), str(cfg.max_seq_length)]).encode()
        ).hexdigest()
        return cls(cfg.encoder, path, assets.model_id(cfg.encoder), cfg.dtype, cfg.normalize,
                   cfg.max_seq_length, fp)

    def key(self, text: str) -> str:
        """Resume key of one row: same encoder settings + same text -> same key."""
        return hashlib.sha256((self.fingerprint + "\0" + text).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=8)
def _folder_digest(path: str) -> str:
    return assets.hash_folder(path)


# --------------------------------------------------------------------------- Ray Data actor


class EncoderActor:
    """Ray Data callable class: pyarrow batch with a ``text`` column -> the same batch without
    ``text``, plus ``vector`` (fixed_size_list<float32>), ``encode_s`` (each row's share of the
    encoder time), ``node_id`` and ``actor_id`` (where it ran, for the stage summary)."""

    def __init__(self, path: str, batch_size: int, dtype: str, normalize: bool, device: str,
                 max_seq_length: Optional[int]):
        self.kw = dict(batch_size=batch_size, dtype=dtype, normalize=normalize,
                       device=pick_device(device), max_seq_length=max_seq_length)
        self.path = path
        load_encoder(path, self.kw["device"], dtype, max_seq_length)  # load before the first batch
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.actor_id = ray.get_runtime_context().get_actor_id()

    def __call__(self, batch: Any):
        import pyarrow as pa

        t0 = time.perf_counter()
        vecs = encode_texts(batch.column("text").to_pylist(), self.path, **self.kw)
        dim = vecs.shape[1]
        vector = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)
        # each row's share of the batch's encoder time: their sum is the pure encode time
        share = pa.array([(time.perf_counter() - t0) / max(1, len(vecs))] * len(vecs), pa.float64())
        node = pa.array([self.node_id] * len(vecs), pa.string())
        actor = pa.array([self.actor_id] * len(vecs), pa.string())
        return (batch.drop_columns(["text"]).append_column("vector", vector).append_column("encode_s", share)
                .append_column("node_id", node).append_column("actor_id", actor))
