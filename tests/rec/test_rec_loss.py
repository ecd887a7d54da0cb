"""The loss at scale: the sampled softmax against the full one, ``auto``'s choice, the negative
sampler, DDP's buffers, and a short Ray Train run that learns with sampled negatives."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rec_testdata import synthetic_run
from slim_ray.config import load_config
from slim_ray.rec import data as rd
from slim_ray.rec.config import (FULL_SOFTMAX_MAX_BYTES, backbone_defaults, choose_loss, full_softmax_logit_bytes,
                                 resolve_hparams)
from slim_ray.rec.fusion import SeqRec, SharedNegatives, full_softmax_loss, sampled_softmax_loss

ML1M_ITEMS = 3706  # MovieLens-1M's catalog


def _hp(**over):
    return {**backbone_defaults("sasrec"), "hidden": 16, "max_len": 6, **over}


def _batch():
    seq = torch.tensor([[1, 2, 3, 4, 0, 0], [7, 8, 9, 10, 11, 12], [20, 5, 0, 0, 0, 0]])
    lens = torch.tensor([4, 6, 2])
    targets = torch.tensor([[2, 3, 4, 5, 0, 0], [8, 9, 10, 11, 12, 13], [5, 6, 0, 0, 0, 0]])
    return seq, lens, torch.tensor([1, 2, 3]), targets


@pytest.mark.parametrize("backbone,mode", [("sasrec", "id"), ("gru4rec", "id_text"), ("srgnn", "text")])
def test_sampled_softmax_over_the_whole_catalog_is_softplus_of_the_full_cross_entropy(backbone, mode):
    """K = n_items, uniform: the negatives are every item once and log q = -log N for all of them.

    Per target t with logits s_j and Z = sum_j exp(s_j), the full loss is l = log Z - s_t. The
    sampled candidates are t and every item (t included: it is never removed), each shifted by the
    same -log q = log N, which cancels in the softmax:
        l_sampled = -s_t + log(exp(s_t) + Z) = log(1 + exp(l)) = softplus(l).
    """
    n = 30
    torch.manual_seed(0)
    text = torch.cat([torch.zeros(1, 8), torch.randn(n, 8)]) if mode != "id" else None
    hp = {**backbone_defaults(backbone), "hidden": 16, "max_len": 6}
    users_text, has = torch.randn(4, 8), torch.ones(4, dtype=torch.bool)  # read by the text mode only
    model = SeqRec(backbone, mode, {**hp, "loss": "sampled_softmax"}, n, text, users_text, has).eval()
    full = SeqRec(backbone, mode, {**hp, "loss": "full_softmax"}, n, text, users_text, has).eval()
    full.load_state_dict(model.state_dict())
    assert (model.loss_kind, full.loss_kind) == ("sampled_softmax", "full_softmax")
    sampler = SharedNegatives(n, k=n, distribution="uniform")
    negs = sampler.draw(torch.Generator().manual_seed(1))
    assert sorted(negs.tolist()) == list(range(1, n + 1))  # the whole catalog, each item once
    assert torch.allclose(sampler.log_q[1:], torch.full((n,), -math.log(n)))  # the constant correction

    seq, lens, users, targets = _batch()
    with torch.no_grad():
        table = model.item_table()
        h = model.user_vectors(seq, lens, users, table)
        if h.dim() == 3:  # a target after every position
            h, tgt = h[targets > 0], targets[targets > 0]
        else:  # SR-GNN: after the last position only
            tgt = targets[torch.arange(len(lens)), lens - 1]
        l_full = full_softmax_loss(h, table, tgt, reduction="none")
        l_sampled = sampled_softmax_loss(h, table, tgt, negs, sampler.log_q, reduction="none")
        no_correction = sampled_softmax_loss(h, table, tgt, negs, torch.zeros(n + 1), reduction="none")
        # the same relation through the models' forward passes (summed over the targets); the
        # sampled one computes item vectors for the batch's items only
        fwd_sampled = float(model(seq, lens, users, targets, negs, log_q=sampler.log_q))
        fwd_full = float(full(seq, lens, users, targets))
    assert len(tgt) == (3 if backbone == "srgnn" else 12)
    assert torch.allclose(l_sampled, F.softplus(l_full), rtol=1e-5, atol=1e-6)
    assert torch.allclose(no_correction, l_sampled, rtol=1e-5, atol=1e-6)  # a constant shift cancels
    assert fwd_full == pytest.approx(float(l_full.sum()), rel=1e-5)
    assert fwd_sampled == pytest.approx(float(F.softplus(l_full).sum()), rel=1e-5)

    # A non-constant log q (popularity) is not a shift: the correction changes the loss.
    counts = torch.arange(n + 1)
    pop = SharedNegatives(n, k=n, distribution="popularity", counts=counts)
    with torch.no_grad():
        l_pop = sampled_softmax_loss(h, table, tgt, negs, pop.log_q, reduction="none")
    assert (l_pop - l_sampled).abs().max() > 1e-2

    # Fewer negatives than items: the forward pass builds vectors for the batch's items only
    # (renumbered into a sub-table) and gives the loss computed on the whole item table.
    few = SharedNegatives(n, k=5).draw(torch.Generator().manual_seed(2))
    assert len(few) == 5 and len(set(few.tolist())) == 5 and int(few.min()) >= 1 and int(few.max()) <= n
    with torch.no_grad():
        on_table = float(sampled_softmax_loss(h, table, tgt, few, sampler.log_q))
        fwd_few = float(model(seq, lens, users, targets, few, log_q=sampler.log_q))
    assert fwd_few == pytest.approx(on_table, rel=1e-5) and abs(fwd_few - fwd_sampled) > 1e-3


def test_auto_picks_full_softmax_for_movielens_and_sampled_above_the_threshold():
    for b in ("sasrec", "gru4rec", "srgnn"):
        hp = backbone_defaults(b)
        assert hp["loss"] == "auto"
        assert choose_loss(hp, ML1M_ITEMS) == "full_softmax"
    sas, gru, gnn = backbone_defaults("sasrec"), backbone_defaults("gru4rec"), backbone_defaults("srgnn")
    # batch 16 x 50 positions x (3706 + 1) columns x 4 bytes; SR-GNN scores only the last position
    assert full_softmax_logit_bytes(sas, ML1M_ITEMS) == 16 * 50 * 3707 * 4 == 11_862_400
    assert full_softmax_logit_bytes(gru, ML1M_ITEMS) == 64 * 50 * 3707 * 4 == 47_449_600
    assert full_softmax_logit_bytes(gnn, ML1M_ITEMS) == 256 * 1 * 3707 * 4
    assert FULL_SOFTMAX_MAX_BYTES == 2 * 1024**3
    # the defaults switch at 2 GiB / (batch x 50 x 4 bytes) - 1 items: SASRec (batch 16) between
    # 671,087 and 671,088, GRU4Rec (batch 64) between 167,771 and 167,772
    assert choose_loss(sas, 671_087) == "full_softmax" and choose_loss(sas, 671_088) == "sampled_softmax"
    assert choose_loss(gru, 167_771) == "full_softmax" and choose_loss(gru, 167_772) == "sampled_softmax"
    # a tiny threshold from the config: the same small catalog now trains with the sampled softmax
    rc = load_config(None, ["rec.params={full_softmax_max_bytes: 1000}", "rec.sampled_negatives=8"]).rec
    hp = resolve_hparams(rc, "sasrec")
    assert hp["sampled_negatives"] == 8
    assert choose_loss(hp, 40) == "sampled_softmax"
    assert SeqRec("sasrec", "id", hp, 40).loss_kind == "sampled_softmax"
    # explicit choices are kept; "softmax" is the older spelling of the full softmax
    assert choose_loss({**sas, "loss": "softmax"}, 10**7) == "full_softmax"
    # the hp of a run folder written before these keys existed still builds (and keeps its loss)
    old = {**sas, "loss": "softmax"}  # no sampled_* / full_softmax_max_bytes keys
    assert SeqRec("sasrec", "id", old, 40).loss_kind == "full_softmax"
    assert choose_loss({**sas, "loss": "bce"}, 10**7) == "bce"
    assert choose_loss({**sas, "loss": "sampled_softmax"}, 10) == "sampled_softmax"


def test_popularity_sampler_draws_in_proportion_and_distinct():
    counts = torch.tensor([0, 0, 1, 3, 7])  # items 1..4 weigh (counts + 1) = 1, 2, 4, 8
    s = SharedNegatives(4, k=1, distribution="popularity", counts=counts)
    q = np.array([1, 2, 4, 8]) / 15
    assert np.allclose(s.log_q[1:].exp().numpy(), q, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([s.draw(gen) for _ in range(20000)]).numpy()
    freq = np.bincount(draws, minlength=5)[1:] / len(draws)
    assert np.abs(freq - q).max() < 0.015, freq
    two = SharedNegatives(4, k=2, distribution="popularity", counts=counts)
    pairs = [two.draw(gen).tolist() for _ in range(200)]
    assert all(len(set(p)) == 2 for p in pairs)
    # the same generator state gives the same negatives (every DDP worker draws the batch's set)
    a = SharedNegatives(100, k=10).draw(torch.Generator().manual_seed(5))
    b = SharedNegatives(100, k=10).draw(torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist()


def test_ddp_broadcasts_no_buffer_and_holds_no_per_user_one(tmp_path):
    """The module DDP wraps keeps only per-item buffers once the user table is popped, and the
    training wrapper's settings stop DDP from re-sending them before every forward pass."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from slim_ray.rec.train import DDP_KWARGS

    n_users, n_items, D = 50, 30, 8
    model = SeqRec("sasrec", "slim", _hp(), n_items, torch.randn(n_items + 1, D), torch.randn(n_users + 1, D),
                   torch.ones(n_users + 1, dtype=torch.bool), learned_no_rationale=True)
    assert {"user_text", "user_has_text"} <= dict(model.named_buffers()).keys()
    model.pop_user_table()
    assert list(dict(model.named_buffers())) == ["item_text"]  # per item, frozen, loaded by each worker
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        default, ours = DDP(model), DDP(model, **DDP_KWARGS)
        assert default.will_sync_module_buffers()  # what DDP would do without DDP_KWARGS
        assert not ours.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


def test_sampled_softmax_training_run_learns(ray_session, tmp_path):
    """loss=auto with a tiny threshold trains a SASRec with 8 popularity-drawn negatives per batch
    on Ray Train; test NDCG@10 (full ranking) ends far above a random ranker's."""
    from slim_ray.rec.checkpoint import load_run
    from slim_ray.rec.metrics import evaluate_vectors, random_reference
    from slim_ray.rec.stage import run_train

    root = str(tmp_path)
    synthetic_run(root, n_users=150, n_items=40, text_dim=16, roles=())
    cfg = load_config(None, [f"run_dir={root}", "rec.backbone=sasrec", "rec.mode=id", "rec.epochs=8",
                             "rec.patience=8", "rec.sampled_negatives=8",
                             "rec.params={full_softmax_max_bytes: 1000, sampled_distribution: popularity}",
                             "rec.hidden=32", "rec.max_len=16", "rec.batch_size=64", "ray.num_cpus=4"])
    run_train(cfg)
    run_dir = cfg.layout.rec_run("sasrec", "id", 0)
    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["hp"]["loss"] == "auto" and meta["loss"] == "sampled_softmax"
    assert meta["full_softmax_logit_bytes"] == 64 * 16 * 41 * 4
    model, _ = load_run(run_dir)
    data = rd.load_sequences(cfg.layout.sequences, None, 40)
    split = rd.eval_split(data, "test", 16)
    with torch.no_grad():
        table = model.item_table()
        uv = model.last_user_vectors(torch.as_tensor(split.seq), torch.as_tensor(split.lens),
                                     torch.as_tensor(split.users), table)
        ndcg = float(evaluate_vectors(uv, table, split, [10])["full"]["ndcg@10"].mean())
    random = random_reference(split.n_candidates, [10])["ndcg@10"]
    print(f"sampled-softmax run: test NDCG@10 {ndcg:.4f}, random {random:.4f}")
    assert ndcg > 3 * random, (ndcg, random)
