"""GRU4Rec: embedding dropout -> GRU -> dense back to the item dimension (RecBole's variant)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class GRU4Rec(nn.Module):
    all_positions = True

    def __init__(self, hp: dict[str, Any]):
        super().__init__()
        d, h = int(hp["hidden"]), int(hp["gru_hidden"])
        self.drop = nn.Dropout(float(hp["dropout"]))
        self.gru = nn.GRU(d, h, int(hp["num_layers"]), batch_first=True, bias=False)
        self.dense = nn.Linear(h, d)

    def forward(self, emb: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        # A GRU is causal: outputs at real positions do not depend on the right padding.
        out, _ = self.gru(self.drop(emb))
        return self.dense(out)
