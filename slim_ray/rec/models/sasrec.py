"""SASRec: learned positions + causal self-attention blocks (post-LN, GELU, as in RecBole)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SASRec(nn.Module):
    all_positions = True

    def __init__(self, hp: dict[str, Any]):
        super().__init__()
        d = int(hp["hidden"])
        self.pos = nn.Embedding(int(hp["max_len"]), d)
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(float(hp["dropout"]))
        layer = nn.TransformerEncoderLayer(
            d, int(hp["num_heads"]), int(hp["inner"]), float(hp["dropout"]),
            activation="gelu", batch_first=True, norm_first=False, layer_norm_eps=1e-12,
        )
        self.blocks = nn.TransformerEncoder(layer, int(hp["num_layers"]), enable_nested_tensor=False)

    def forward(self, emb: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        L = emb.shape[1]
        pos = torch.arange(L, device=emb.device)
        x = self.drop(self.norm(emb + self.pos(pos)[None]))
        # Right padding + a causal mask: a real position never attends to a later (padded) one.
        causal = torch.triu(torch.full((L, L), float("-inf"), device=emb.device), diagonal=1)
        return self.blocks(x, mask=causal)
