"""Backbones: sequence encoders that map a history of item vectors to user vectors.

Each backbone gets ``(emb [B, L, d], seq [B, L], lens [B])`` -- right-padded item vectors (padding
rows already zero), the item ids (only used to build session graphs, never as parameters) and the
true lengths -- and returns either ``[B, L, d]`` (one user vector after every position:
``all_positions = True``) or ``[B, d]`` (after the last position only). No backbone owns item
embeddings: the item table comes from ``slim_ray.rec.fusion``, which is what lets one backbone run
in every mode, including the ID-agnostic one.
"""

from __future__ import annotations

from typing import Any


def build_backbone(name: str, hp: dict[str, Any]):
    if name == "sasrec":
        from slim_ray.rec.models.sasrec import SASRec

        return SASRec(hp)
    if name == "gru4rec":
        from slim_ray.rec.models.gru4rec import GRU4Rec

        return GRU4Rec(hp)
    if name == "srgnn":
        from slim_ray.rec.models.srgnn import SRGNN

        return SRGNN(hp)
    raise ValueError(f"unknown backbone {name!r}")
