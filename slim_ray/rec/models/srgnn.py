"""SR-GNN: a gated GNN over each session's item graph, then an attention read-out.

The session graph is built in torch for the whole batch at once: a position is a node when it is
the first occurrence of its item in the row; edges join consecutive positions' nodes (binary, then
normalised by in/out degree as in the paper's reference code). Item ids are only used to find
repeated items, never as parameters, so SR-GNN works in the ID-agnostic mode too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from slim_ray.rec.config import SRGNNParams


class GNNCell(nn.Module):
    def __init__(self, d: int, step: int):
        super().__init__()
        self.step = step
        self.w_ih = nn.Parameter(torch.empty(3 * d, 2 * d))
        self.w_hh = nn.Parameter(torch.empty(3 * d, d))
        self.b_ih = nn.Parameter(torch.zeros(3 * d))
        self.b_hh = nn.Parameter(torch.zeros(3 * d))
        self.b_iah = nn.Parameter(torch.zeros(d))
        self.b_oah = nn.Parameter(torch.zeros(d))
        self.edge_in = nn.Linear(d, d)
        self.edge_out = nn.Linear(d, d)
        stdv = 1.0 / math.sqrt(d)
        for w in (self.w_ih, self.w_hh):
            nn.init.uniform_(w, -stdv, stdv)

    def forward(self, a_in: torch.Tensor, a_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for _ in range(self.step):
            x_in = a_in @ self.edge_in(h) + self.b_iah
            x_out = a_out @ self.edge_out(h) + self.b_oah
            gi = F.linear(torch.cat([x_in, x_out], -1), self.w_ih, self.b_ih)
            gh = F.linear(h, self.w_hh, self.b_hh)
            i_r, i_i, i_n = gi.chunk(3, -1)
            h_r, h_i, h_n = gh.chunk(3, -1)
            reset = torch.sigmoid(i_r + h_r)
            update = torch.sigmoid(i_i + h_i)
            new = torch.tanh(i_n + reset * h_n)
            h = (1 - update) * h + update * new
        return h


def session_graph(seq: torch.Tensor, lens: torch.Tensor):
    """(alias [B, L], a_in [B, L, L], a_out [B, L, L]) over node slots = positions of first occurrence."""
    B, L = seq.shape
    valid = torch.arange(L, device=seq.device)[None] < lens[:, None]
    same = (seq[:, :, None] == seq[:, None, :]) & valid[:, None, :]
    alias = same.to(torch.int64).argmax(-1)  # first position holding the same item
    alias = torch.where(valid, alias, torch.zeros_like(alias))
    adj = torch.zeros(B, L, L, device=seq.device)
    edge = valid[:, 1:]  # position j -> j+1 when both are real
    src, dst = alias[:, :-1], alias[:, 1:]
    b = torch.arange(B, device=seq.device)[:, None].expand_as(src)
    adj[b[edge], src[edge], dst[edge]] = 1.0
    out_deg = adj.sum(-1, keepdim=True).clamp(min=1)
    in_deg = adj.sum(-2, keepdim=True).clamp(min=1)
    a_out = adj / out_deg
    a_in = (adj / in_deg).transpose(1, 2)
    return alias, a_in, a_out


class SRGNN(nn.Module):
    all_positions = False

    def __init__(self, p: SRGNNParams):
        super().__init__()
        d = p.hidden
        self.gnn = GNNCell(d, p.step)
        self.drop = nn.Dropout(p.dropout)
        self.lin1 = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)
        self.lin3 = nn.Linear(d, 1, bias=False)
        self.out = nn.Linear(2 * d, d)

    def forward(self, emb: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        alias, a_in, a_out = session_graph(seq, lens)
        # Node features: the item vector at each first-occurrence slot (others are never read).
        nodes = self.gnn(a_in, a_out, self.drop(emb))
        hidden = torch.gather(nodes, 1, alias[..., None].expand(-1, -1, nodes.shape[-1]))
        last = hidden[torch.arange(len(lens), device=seq.device), lens - 1]
        mask = (torch.arange(seq.shape[1], device=seq.device)[None] < lens[:, None]).float()[..., None]
        alpha = self.lin3(torch.sigmoid(self.lin1(last)[:, None] + self.lin2(hidden)))
        glob = (alpha * hidden * mask).sum(1)
        return self.out(torch.cat([glob, last], -1))
