"""The recommender: an item tower that depends on the mode, a backbone, and the user-side fusion.

Modes (DESIGN.md 1.5; ``d`` = hidden, ``T_i`` item text vector, ``S_u`` rationale vector):

    id       z_i = E_i                          s_u = SeqEnc(z_hist)
    id_text  z_i = g_f([g_l(T_i); E_i])         s_u = SeqEnc(z_hist)                 ("backbone+")
    slim     z_i = g_f([g_l(T_i); E_i])         s_u = g_f([g_l(S_u); SeqEnc(z_hist)])
    text     z_i = g_l(T_i)  (g_l is g_t)       s_u = g_f([g_l(S_u); SeqEnc(z_hist)])

``g_l`` (text -> d) and ``g_f`` (2d -> d) are linear and shared by the item and the user side, as in
the paper's notation. In ``text`` mode nothing is indexed by an item or user id (the backbone only
reads vectors, positions and the item ids' equality pattern), so the model scores items and users
it never saw, as long as they have text. Text vectors are frozen buffers saved in the checkpoint,
so a trained model is self-contained. Score = dot product; loss (``choose_loss``, docs/rec.md "Loss
at scale") = softmax CE over all items, softmax CE against negatives the batch shares with the logQ
correction (large catalogs), or BCE against sampled negatives.

Rationales and time (docs/rec.md, "Rationale protocol"): a rationale written from the first ``c``
items may only inform predictions of targets at positions >= ``c``. Training passes a
``rationale_mask`` [B, L] that says, per position, whether its rationale may be fused; masked
positions fuse the learned "no rationale" vector instead. Evaluation and serving pass no mask: the
rationale was written from a prefix of the history the model reads, so every position may use it.

During training the per-user rationale table is not a module buffer (DDP would copy it into every
worker and broadcast it every step): ``pop_user_table`` takes it off the module and the training
loop passes each batch's rationale vectors in (``rationale``, ``has_rationale``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from slim_ray.rec.config import SAMPLED_NEGATIVES, choose_loss
from slim_ray.rec.models import build_backbone


class SeqRec(nn.Module):
    def __init__(
        self,
        backbone: str,
        mode: str,
        hp: dict[str, Any],
        n_items: int,
        item_text: Optional[torch.Tensor] = None,  # [n_items + 1, D], row 0 = padding
        user_text: Optional[torch.Tensor] = None,  # [n_users + 1, D], zero rows where missing
        user_has_text: Optional[torch.Tensor] = None,  # [n_users + 1] bool
        missing_rationale: str = "error",
        learned_no_rationale: Optional[bool] = None,
    ):
        """``learned_no_rationale``: train one "no rationale" vector (users without a rationale under
        ``missing_rationale=learned``; positions before the rationale's cut under the consistent
        protocol). None: only when ``missing_rationale == "learned"``."""
        super().__init__()
        self.backbone_name, self.mode, self.hp = backbone, mode, dict(hp)
        self.n_items = n_items
        d = int(hp["hidden"])
        self.backbone = build_backbone(backbone, hp)
        self.all_positions = self.backbone.all_positions
        self.loss_kind = choose_loss(hp, n_items)  # full_softmax | sampled_softmax | bce
        self.item_id = None
        if mode in ("id", "id_text", "slim"):
            self.item_id = nn.Embedding(n_items + 1, d, padding_idx=0)
        if mode != "id":
            if item_text is None:
                raise ValueError(f"mode {mode!r} needs item text vectors")
            self.register_buffer("item_text", item_text.float())
            self.g_l = nn.Linear(item_text.shape[1], d)
        if mode in ("id_text", "slim", "text"):
            self.g_f = nn.Linear(2 * d, d)
        self.uses_rationales = mode in ("slim", "text")
        if self.uses_rationales:
            if user_text is None or user_has_text is None:
                raise ValueError(f"mode {mode!r} needs user rationale vectors")
            self.register_buffer("user_text", user_text.float())
            self.register_buffer("user_has_text", user_has_text.bool())
            self.no_rationale = None
            if learned_no_rationale is None:
                learned_no_rationale = missing_rationale == "learned"
            if learned_no_rationale:
                self.no_rationale = nn.Parameter(torch.zeros(user_text.shape[1]))
        self._init(backbone)

    def _init(self, backbone: str) -> None:
        d = int(self.hp["hidden"])
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                if backbone == "gru4rec":
                    nn.init.xavier_normal_(m.weight)
                elif backbone == "srgnn":
                    nn.init.uniform_(m.weight, -1 / math.sqrt(d), 1 / math.sqrt(d))
                else:
                    nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
        std = self.hp.get("linear_init_std")
        if std is not None:  # RecBole's scheme (initializer_range): N(0, std) weights, zero biases
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=float(std))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                    nn.init.normal_(m.in_proj_weight, std=float(std))
                    if m.in_proj_bias is not None:
                        nn.init.zeros_(m.in_proj_bias)

    # ------------------------------------------------------------------ towers

    def item_table(self) -> torch.Tensor:
        """[n_items + 1, d]: the vector of every item (row 0 is padding, never scored)."""
        if self.mode == "id":
            return self.item_id.weight
        text = self.g_l(self.item_text)
        if self.mode == "text":
            return text
        return self.g_f(torch.cat([text, self.item_id.weight], -1))

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., d]: the rows ``ids`` of ``item_table()``, computed for those items only."""
        if self.mode == "id":
            return self.item_id(ids)
        text = self.g_l(self.item_text[ids])
        if self.mode == "text":
            return text
        return self.g_f(torch.cat([text, self.item_id(ids)], -1))

    def pop_user_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the per-user rationale table off the module (returns (user_text, user_has_text)), so
        that wrapping the model in DDP neither copies nor broadcasts it; the caller then passes each
        batch's rows as ``rationale`` / ``has_rationale``."""
        text, has = self._buffers.pop("user_text"), self._buffers.pop("user_has_text")
        return text, has

    def put_user_table(self, user_text: torch.Tensor, user_has_text: torch.Tensor) -> None:
        """Register the table again (before saving a self-contained model.pt)."""
        self.register_buffer("user_text", user_text)
        self.register_buffer("user_has_text", user_has_text)

    def rationale(self, users: torch.Tensor) -> torch.Tensor:
        """g_l of the stored rationale vectors of ``users`` (the fallback for users without one)."""
        return self._fused_rationale(self.user_text[users], self.user_has_text[users])

    def _fused_rationale(self, vec: torch.Tensor, has: Optional[torch.Tensor]) -> torch.Tensor:
        if self.no_rationale is not None and has is not None:
            vec = torch.where(has[:, None], vec, self.no_rationale[None])
        return self.g_l(vec)

    def _before_cut(self, like: torch.Tensor) -> torch.Tensor:
        """[d]: what a position before the rationale's cut fuses: g_l(no-rationale vector), or g_l(0)."""
        v = self.no_rationale if self.no_rationale is not None else like.new_zeros(self.g_l.in_features)
        return self.g_l(v)

    def user_vectors(self, seq: torch.Tensor, lens: torch.Tensor, users: Optional[torch.Tensor], table: torch.Tensor,
                     rationale: Optional[torch.Tensor] = None, has_rationale: Optional[torch.Tensor] = None,
                     rationale_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L, d] (all-position backbones) or [B, d] (SR-GNN): user vector after each position.

        ``rationale`` [B, D] (text vectors; ``has_rationale`` [B] bool marks real ones) replaces the
        stored vectors of ``users``: this is how training batches carry them and how a user unseen
        in training (a serving request) is scored. ``rationale_mask`` [B, L] bool: positions whose
        target comes before the rationale's cut fuse the "no rationale" vector (None: none do)."""
        emb = table[seq] * (seq > 0)[..., None].to(table.dtype)
        h = self.backbone(emb, seq, lens)
        if self.uses_rationales:
            r = self._fused_rationale(rationale, has_rationale) if rationale is not None else self.rationale(users)
            if h.dim() == 3:
                r = r[:, None].expand(-1, h.shape[1], -1)
                mask = rationale_mask
            else:
                mask = None if rationale_mask is None else rationale_mask[torch.arange(len(lens)), lens - 1]
            if mask is not None:
                r = torch.where(mask[..., None], r, self._before_cut(r))
            h = self.g_f(torch.cat([r, h], -1))
        return h

    def last_user_vectors(self, seq, lens, users, table, rationale=None, has_rationale=None) -> torch.Tensor:
        """[B, d]: the user vector after the last real position (what is scored at evaluation)."""
        h = self.user_vectors(seq, lens, users, table, rationale, has_rationale)
        if h.dim() == 3:
            h = h[torch.arange(len(lens), device=h.device), lens - 1]
        return h

    # ------------------------------------------------------------------ training loss

    def forward(self, seq, lens, users, targets, negatives=None, norm: float = 1.0,
                rationale=None, has_rationale=None, rationale_mask=None, log_q=None) -> torch.Tensor:
        """Summed loss over every target (``targets > 0``), divided by ``norm``.

        ``targets`` is [B, L] (the item to predict after each position; 0 = none). SR-GNN predicts
        only after the last position. ``negatives``: [B, L, k] per target for ``bce``; [K] shared by
        the whole batch for ``sampled_softmax``, with ``log_q`` [n_items + 1] the log of each item's
        sampling probability (``SharedNegatives``). ``rationale`` / ``has_rationale`` /
        ``rationale_mask``: see ``user_vectors``.
        """
        per_target = self.loss_kind == "bce"
        if self.loss_kind == "full_softmax":
            table = self.item_table()
        else:
            # Only the items this batch reads, predicts or samples get a vector (the text modes'
            # item tower is a matmul over the catalog otherwise); ids are renumbered into that
            # sub-table, 0 (padding) staying 0, which keeps every equality the backbones read.
            if negatives is None:
                raise ValueError(f"loss={self.loss_kind} needs negatives")
            ids = torch.unique(torch.cat([seq.new_zeros(1), seq.flatten(), targets.flatten(), negatives.flatten()]))
            table = self.item_vectors(ids)
            seq, targets, negatives = (torch.searchsorted(ids, x) for x in (seq, targets, negatives))
            if log_q is not None:
                log_q = log_q[ids]
        h = self.user_vectors(seq, lens, users, table, rationale, has_rationale, rationale_mask)
        if h.dim() == 3:
            sel = targets > 0
            hs, tgt = h[sel], targets[sel]
            negs = negatives[sel] if per_target else negatives
        else:
            last = lens - 1
            ar = torch.arange(len(lens), device=h.device)
            hs, tgt = h, targets[ar, last]
            negs = negatives[ar, last] if per_target else negatives
        if self.loss_kind == "full_softmax":
            loss = full_softmax_loss(hs, table, tgt)
        elif self.loss_kind == "sampled_softmax":
            if log_q is None:
                raise ValueError("loss=sampled_softmax needs the sampling log-probabilities log_q (SharedNegatives)")
            loss = sampled_softmax_loss(hs, table, tgt, negs, log_q)
        else:
            pos = (hs * table[tgt]).sum(-1)
            neg = torch.einsum("md,mkd->mk", hs, table[negs])
            loss = F.softplus(-pos).sum() + F.softplus(neg).sum()
        return loss / norm


# --------------------------------------------------------------------------- softmax losses


def full_softmax_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                      reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of each target over every item: ``h`` [M, d], ``table`` [n_items + 1, d]
    (row 0, padding, is never a candidate), ``targets`` [M]. Builds the [M, n_items + 1] logits."""
    logits = h @ table.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets, reduction=reduction)


def sampled_softmax_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                         log_q: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of each target against the K negatives its batch shares, logQ-corrected.

    The candidates of a target ``t`` are ``t`` itself and ``negatives`` [K]; every candidate's
    logit ``h . E_j`` has ``log_q[j]`` (the log of its sampling probability) subtracted, so that
    items the sampler draws often are not over-penalised and the sum over candidates estimates the
    full softmax's normaliser. A negative equal to the target is kept (never removed): with K = the
    whole catalog drawn uniformly, the loss is exactly ``softplus(full cross-entropy)``
    (tests/rec/test_rec_loss.py). Builds [M, K + 1] logits instead of [M, n_items + 1].
    """
    pos = (h * table[targets]).sum(-1) - log_q[targets]
    neg = h @ table[negatives].T - log_q[negatives][None]
    logits = torch.cat([pos[:, None], neg], 1)
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction=reduction)


class SharedNegatives:
    """Draws the negatives one training batch shares under ``loss=sampled_softmax``.

    ``uniform``: every item equally likely; ``popularity``: proportional to ``counts`` + 1 (how
    often an item occurs in the training prefixes; the +1 keeps every item drawable). Each draw
    takes ``k`` distinct items (all of them when the catalog is smaller), by Gumbel top-k: the same
    as drawing items one at a time without replacement, in O(n_items) per batch -- the order of the
    item table the model already builds each step. ``log_q`` [n_items + 1] is the log of each
    item's sampling probability (row 0, padding, is never drawn).
    """

    def __init__(self, n_items: int, k: int = SAMPLED_NEGATIVES, distribution: str = "uniform",
                 counts: Optional[torch.Tensor] = None):
        if distribution == "uniform":
            weights = torch.ones(n_items, dtype=torch.float64)
        elif distribution == "popularity":
            if counts is None or len(counts) != n_items + 1:
                raise ValueError(f"popularity sampling needs item counts [n_items + 1 = {n_items + 1}]")
            weights = counts[1:].to(torch.float64) + 1.0
        else:
            raise ValueError(f"unknown negative distribution {distribution!r}: expected uniform or popularity")
        q = weights / weights.sum()
        self.n_items, self.k, self.distribution = n_items, min(int(k), n_items), distribution
        self.log_q = torch.cat([torch.zeros(1, dtype=torch.float64), q.log()]).float()

    def draw(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[k] distinct item ids in 1..n_items (int64), from ``generator`` (the same on every worker)."""
        u = torch.rand(self.n_items, generator=generator).clamp_(min=1e-30)
        keys = self.log_q[1:] - torch.log(-torch.log(u))
        return keys.topk(self.k).indices + 1
