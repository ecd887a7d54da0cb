"""Backbones: sequence encoders that map a history of item vectors to user vectors.

Each backbone gets ``(emb [B, L, d], seq [B, L], lens [B])`` -- right-padded item vectors (padding
rows already zero), the item ids (only used to build session graphs, never as parameters) and the
true lengths -- and returns either ``[B, L, d]`` (one user vector after every position:
``all_positions = True``) or ``[B, d]`` (after the last position only). No backbone owns item
embeddings: the item table comes from ``slim_ray.rec.fusion``, which is what lets one backbone run
in every mode, including the ID-agnostic one.

A backbone is built from its typed hyper-parameters (``slim_ray.rec.config.SASRecParams`` etc.):
``build_backbone`` validates the run's ``hp`` dict (from a config, a run spec or a checkpoint's
meta) before any layer is made.
"""

from __future__ import annotations

from typing import Any

from slim_ray.rec.config import validate_hparams


def build_backbone(name: str, hp: dict[str, Any]):
    """The backbone ``name`` built from ``hp`` (validated by its params model; ValueError names a bad key)."""
    if name == "sasrec":
        from slim_ray.rec.models.sasrec import SASRec

        return SASRec(validate_hparams(name, hp))
    if name == "gru4rec":
        from slim_ray.rec.models.gru4rec import GRU4Rec

        return GRU4Rec(validate_hparams(name, hp))
    if name == "srgnn":
        from slim_ray.rec.models.srgnn import SRGNN

        return SRGNN(validate_hparams(name, hp))
    raise ValueError(f"unknown backbone {name!r}")
