"""GRU4Rec: embedding dropout -> GRU -> dense back to the item dimension (RecBole's variant)."""

from __future__ import annotations

import torch
from torch import nn

from slim_ray.rec.config import GRU4RecParams


class GRU4Rec(nn.Module):
    all_positions = True

    def __init__(self, p: GRU4RecParams):
        super().__init__()
        d, h = p.hidden, p.gru_hidden
        self.drop = nn.Dropout(p.dropout)
        self.gru = nn.GRU(d, h, p.num_layers, batch_first=True, bias=False)
        self.dense = nn.Linear(h, d)

    def forward(self, emb: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        # A GRU is causal: outputs at real positions do not depend on the right padding.
        out, _ = self.gru(self.drop(emb))
        return self.dense(out)
