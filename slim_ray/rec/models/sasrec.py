"""SASRec: learned positions + causal self-attention blocks (post-LN, GELU, as in RecBole)."""

from __future__ import annotations

import torch
from torch import nn

from slim_ray.rec.config import SASRecParams


class SASRec(nn.Module):
    all_positions = True

    def __init__(self, p: SASRecParams):
        super().__init__()
        d = p.hidden
        self.pos = nn.Embedding(p.max_len, d)
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(p.dropout)
        layer = nn.TransformerEncoderLayer(
            d, p.num_heads, p.inner, p.dropout,
            activation="gelu", batch_first=True, norm_first=False, layer_norm_eps=1e-12,
        )
        self.blocks = nn.TransformerEncoder(layer, p.num_layers, enable_nested_tensor=False)

    def forward(self, emb: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        L = emb.shape[1]
        pos = torch.arange(L, device=emb.device)
        x = self.drop(self.norm(emb + self.pos(pos)[None]))
        # Right padding + a causal mask: a real position never attends to a later (padded) one.
        causal = torch.triu(torch.full((L, L), float("-inf"), device=emb.device), diagonal=1)
        return self.blocks(x, mask=causal)
