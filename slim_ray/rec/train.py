"""Train the sweep's runs (backbone, variant, seed) on Ray Train (one ``TorchTrainer``, DDP).

Every worker loads the (small) sequences and text vectors itself, draws the same global batch order
from the run's seed, and trains on its contiguous slice of each global batch. The loss is summed
and divided by (targets in the global batch / world size), so DDP's gradient average equals the
gradient of the global-batch mean: 1 worker and N workers take the same steps (up to dropout
noise and float rounding). Sampled negatives (loss=bce, and the negatives a batch shares under
loss=sampled_softmax) are drawn for the global batch too, so every worker draws the same ones.

The loss is the config's ``loss`` resolved by ``choose_loss`` (``auto``: the full softmax while one
batch's logits fit in ``full_softmax_max_bytes``, the sampled softmax above); meta.json records the
choice (``loss``) and the byte count it was made on.

The per-user rationale table is not part of the DDP module: each batch carries its users'
rationale vectors, and under ``rec.rationale_protocol=consistent`` a mask that keeps a rationale
out of the positions whose targets it may have read (docs/rec.md, "Rationale protocol"). The
buffers left on the module (the frozen item text vectors) are built identically by every worker,
so DDP is told not to broadcast them before every forward pass (``DDP_KWARGS``).

Validation (full ranking NDCG@10 on the valid target) is sharded over workers and all-reduced, so
every worker takes the same early-stopping decision. Each improvement is reported with a
checkpoint through ``ray.train.report`` (weights without the frozen text buffers + optimizer),
from which a restarted worker group resumes the run (``FailureConfig(max_failures=1)``). When a
run ends, rank 0 publishes ``rec/<run>/model.pt`` and ``meta.json`` through
``slim_ray.rec.checkpoint`` (to a path or a storage URI); finished runs are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Optional

import numpy as np

from slim_ray import storage
from slim_ray.rec.checkpoint import is_finished, write_run
from slim_ray.rec.config import RecConfig, base_role, full_softmax_logit_bytes, resolve_hparams, variant_name

logger = logging.getLogger(__name__)

def run_spec(cfg, backbone: str, mode: str, role: Optional[str], seed: int,
             protocol: Optional[str] = None, ingest: str = "memory") -> dict[str, Any]:
    """Everything one run needs, as plain JSON (shipped to the Ray Train workers). ``protocol``:
    the rationale protocol of a rationale variant (None: the first of ``rec.rationale_protocol``);
    ``ingest``: ``memory`` or ``dataset`` (``slim_ray.rec.ingest``)."""
    rc: RecConfig = cfg.rec
    lay = cfg.layout
    protocol = (protocol or rc.protocols[0]) if role else None
    spec = {
        "backbone": backbone, "mode": mode, "role": role, "variant": variant_name(mode, role, protocol),
        "seed": int(seed), "hp": resolve_hparams(rc, backbone),
        "sequences": storage.normalize(lay.sequences), "items": storage.normalize(lay.items),
        "item_embeddings": storage.normalize(lay.item_embeddings) if mode != "id" else None,
        "user_embeddings": storage.normalize(lay.user_embeddings(role)) if role else None,
        "missing_rationale": rc.missing_rationale, "max_users": rc.max_users,
        "eval_every": rc.eval_every,
    }
    if protocol is not None:  # absent for id / id_text runs: their fingerprint does not change
        spec["rationale_protocol"] = protocol
        spec["rationales"] = storage.normalize(lay.rationales(base_role(role))) if protocol == "consistent" else None
    # absent at their defaults, so the fingerprints of runs trained before them do not change
    if ingest == "dataset":
        spec["ingest"] = "dataset"
    if rc.max_steps is not None:
        spec["max_steps"] = int(rc.max_steps)
    spec["fingerprint"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec


# --------------------------------------------------------------------------- building blocks


def build_model(spec: dict[str, Any], data):
    """The SeqRec model of a spec, plus the ids of users that fall back to no rationale."""
    import torch

    from slim_ray.rec import data as rd

    user_text = has = None
    fallback: list[int] = []
    if spec["user_embeddings"]:
        ut, has_np, fallback = rd.user_text_table(spec["user_embeddings"], data.user_ids, data.n_users,
                                                  spec["missing_rationale"])
        user_text, has = torch.from_numpy(ut), torch.from_numpy(has_np)
    return new_model(spec, data.n_items, user_text, has), fallback


def new_model(spec: dict[str, Any], n_items: int, user_text=None, user_has_text=None):
    """A SeqRec of a spec with the item text table read from its embeddings and the given per-user
    rationale table (a one-row table of the right width is enough when batches carry the rows)."""
    import torch

    from slim_ray.rec import data as rd
    from slim_ray.rec.fusion import SeqRec

    item_text = None
    if spec["item_embeddings"]:
        item_text = torch.from_numpy(rd.item_text_table(spec["item_embeddings"], n_items))
    learned = spec["missing_rationale"] == "learned" or spec.get("rationale_protocol") == "consistent"
    return SeqRec(spec["backbone"], spec["mode"], spec["hp"], n_items, item_text, user_text, user_has_text,
                  spec["missing_rationale"], learned_no_rationale=bool(learned and spec["user_embeddings"]))


def load_data(spec: dict[str, Any]):
    from slim_ray.rec import data as rd

    n_items = rd.count_items(spec["items"])
    return rd.load_sequences(spec["sequences"], spec["max_users"], n_items)


def valid_ndcg(model, split, rank: int, world: int, device, user_table=None, k: int = 10,
               batch_users: int = 2048) -> tuple[float, float]:
    """(sum of NDCG@k, sum of HR@k) over this worker's shard of the validation users, ``batch_users``
    at a time (the backbone's activations for every user at once grow with the number of users).
    ``user_table``: (rationale vectors, has) indexed by user id, for the rationale modes."""
    import torch

    from slim_ray.rec.metrics import evaluate_vectors

    mine = np.array_split(np.arange(len(split.users)), world)[rank]  # a contiguous block per worker
    ndcg = hr = 0.0
    with torch.no_grad():
        table = model.item_table()
        for start in range(0, len(mine), batch_users):
            block = mine[start:start + batch_users]
            sub = _rows_slice(split, int(block[0]), int(block[-1]) + 1)
            users = torch.as_tensor(sub.users)
            rat = has = None
            if user_table is not None:
                rat, has = user_table[0][users].to(device), user_table[1][users].to(device)
            uv = model.last_user_vectors(torch.as_tensor(sub.seq, device=device),
                                         torch.as_tensor(sub.lens, device=device), users.to(device), table, rat, has)
            m = evaluate_vectors(uv, table, sub, [k])["full"]
            ndcg += float(m[f"ndcg@{k}"].sum())
            hr += float(m[f"hr@{k}"].sum())
    return ndcg, hr


def train_item_counts(data) -> np.ndarray:
    """[n_items + 1] int64: how often each item occurs in the users' training prefixes (valid and
    test targets are never counted: popularity sampling must not see them)."""
    prefixes = [s[:-2] for s in data.seqs]
    flat = np.concatenate(prefixes) if prefixes else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=data.n_items + 1)[: data.n_items + 1]


def negative_sampler(hp: dict[str, Any], n_items: int, item_counts):
    """The ``SharedNegatives`` of a sampled-softmax run (its rec.params keys, or their defaults).
    ``item_counts()``: the training-prefix count of each item, asked for popularity draws only."""
    import torch

    from slim_ray.rec.config import SAMPLED_NEGATIVES
    from slim_ray.rec.fusion import SharedNegatives

    distribution = hp.get("sampled_distribution") or "uniform"
    counts = torch.as_tensor(np.asarray(item_counts(), np.int64)) if distribution == "popularity" else None
    k = int(hp.get("sampled_negatives") or SAMPLED_NEGATIVES)
    return SharedNegatives(n_items, k, distribution, counts)


def _rows_slice(split, lo: int, hi: int):
    """Users ``lo:hi`` of an EvalSplit (its exclusion rows are sorted by user: a searchsorted cut)."""
    from slim_ray.rec.data import EvalSplit

    a, b = np.searchsorted(split.excl_rows, [lo, hi])
    return EvalSplit(split.users[lo:hi], split.seq[lo:hi], split.lens[lo:hi], split.targets[lo:hi],
                     split.excl_rows[a:b] - lo, split.excl_cols[a:b], split.n_candidates[lo:hi])


# --------------------------------------------------------------------------- the worker loop

BUFFERS = ("item_text", "user_text", "user_has_text")
# The module's buffers are frozen inputs every worker loads itself: no per-step broadcast (DDP's
# default re-sends every buffer from rank 0 before each forward; item_text alone is n_items x D).
DDP_KWARGS = {"forward_sync_buffers": False}


def plateau_lr(hp: dict[str, Any], lr: float, improved: bool, bad: int) -> float:
    """The learning rate after a validation: ``rec.params.lr_plateau_factor`` times ``lr`` after every
    ``lr_plateau_patience`` (default 2) validations in a row without a better valid NDCG@10 (``bad``
    of them so far), else ``lr``. Absent factor: a constant learning rate."""
    factor = hp.get("lr_plateau_factor")
    if factor is None or improved or bad == 0 or bad % int(hp.get("lr_plateau_patience") or 2):
        return lr
    return lr * float(factor)


class WeightAverage:
    """An exponential moving average of a model's trainable weights (``rec.params.ema_decay``).

    Validation scores the average and the best average is what gets published: with small batches
    the weights of any one step are noisy, and early stopping on them can keep a lucky peak. The
    decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run's
    average is not stuck near its first steps. Only parameters are averaged: torch's
    ``AveragedModel`` would also copy every buffer (the frozen item text table) at every step and
    keep a second copy of it. Every worker holds the same weights after each DDP step, so every
    worker's average is the same. A resumed run restarts the average from the checkpoint's
    (averaged) weights."""

    def __init__(self, core, decay: float):
        self.decay, self.updates = float(decay), 0
        self.params = [p for p in core.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        """After an optimizer step: move the average towards the weights."""
        import torch

        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.average, self.params, weight)
        self.updates += 1

    def swap(self) -> None:
        """Exchange the model's weights with the average (call again to swap back)."""
        import torch

        with torch.no_grad():
            for a, p in zip(self.average, self.params):
                tmp = p.detach().clone()
                p.copy_(a)
                a.copy_(tmp)


def weight_average(core, hp: dict[str, Any]) -> Optional[WeightAverage]:
    """The run's ``WeightAverage`` when ``rec.params.ema_decay`` is set, else None."""
    decay = hp.get("ema_decay")
    return None if decay is None else WeightAverage(core, decay)


def _weights(state: dict) -> dict:
    """A state dict without the frozen text buffers (they are rebuilt from the inputs on resume)."""
    return {k: v for k, v in state.items() if k not in BUFFERS}


def sweep_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train each run of the sweep in turn.

    One TorchTrainer for the whole sweep: the worker group (processes, torch import, process group)
    is started once, not once per run. A run whose folder is already finished is skipped.
    """
    import torch

    torch.set_num_threads(int(config["torch_threads"]))
    for spec, run_dir in config["runs"]:
        if is_finished(run_dir, spec["fingerprint"]):
            continue
        train_one(spec, run_dir)


def _worker_node_ids(world: int) -> list[str]:
    """Sorted distinct Ray node ids of the worker group (gathered over the process group)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node)
    return sorted(set(nodes))


class _Run:
    """The state of one run on one worker (``rec.ingest=memory``): every worker reads all users,
    draws the same global batch order and trains on its slice of each global batch."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.spec, self.hp, self.seed = spec, spec["hp"], spec["seed"]
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.max_len = int(self.hp["max_len"])
        self.max_steps = spec.get("max_steps")
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        model = self.load_inputs()
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_KWARGS)
        self.core = self.model.module if hasattr(self.model, "module") else self.model
        self.device = next(self.core.parameters()).device
        # fused: one kernel for every parameter; the per-tensor loop was 8 % of a SASRec step on CPU
        self.opt = torch.optim.Adam(self.model.parameters(), lr=float(self.hp["lr"]),
                                    weight_decay=float(self.hp["weight_decay"]), fused=True)
        self.sampler = self.log_q = None
        if self.core.loss_kind == "sampled_softmax":
            self.sampler = negative_sampler(self.hp, self.n_items, self.item_counts)
            self.log_q = self.sampler.log_q.to(self.device)
        self.start_epoch, self.best, self.best_epoch, self.bad, self.total_steps = 0, -1.0, -1, 0, 0
        self.history: list[dict] = []
        self.epoch_secs: list[float] = []
        self.best_state = None
        self.ema = weight_average(self.core, self.hp)

    def load_inputs(self):
        """Read the run's users; set the counts and tables the loop uses; return the model."""
        from slim_ray.rec import data as rd

        self.data = load_data(self.spec)
        model, fallback = build_model(self.spec, self.data)
        self.n_items, self.n_users, self.max_user_id = self.data.n_items, len(self.data), self.data.n_users
        self.fallback_count, self.fallback_ids = len(fallback), fallback[:20]
        # The per-user table leaves the module before DDP wraps it: batches carry their rows instead.
        self.user_table = model.pop_user_table() if model.uses_rationales else None
        self.cuts = (rd.rationale_cuts(self.spec["rationales"], self.data)
                     if self.spec.get("rationale_protocol") == "consistent" else None)
        self.valid = rd.eval_split(self.data, "valid", self.max_len)
        self.fixed = (self.windows(None) if self.hp["train_on"] == "all_positions" and not self.hp.get("window_jitter")
                      else None)
        return model

    def item_counts(self) -> np.ndarray:
        return train_item_counts(self.data)

    def out_of_steps(self) -> bool:
        """``rec.max_steps`` reached (every worker counts the same steps)."""
        return self.max_steps is not None and self.total_steps >= int(self.max_steps)

    def resume(self) -> None:
        """Continue from the worker group's last checkpoint when it belongs to this run."""
        import torch
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            path = os.path.join(d, "state.pt")
            st = torch.load(path, map_location=self.device, weights_only=True) if os.path.exists(path) else None
        if st is None or st.get("fingerprint") != self.spec["fingerprint"]:
            return
        self.core.load_state_dict(st["model"], strict=False)
        self.opt.load_state_dict(st["optimizer"])
        self.start_epoch, self.best, self.best_epoch = st["epoch"] + 1, st["best"], st["epoch"]
        self.total_steps = int(st.get("total_steps", 0))
        self.history, self.epoch_secs = st["history"], st["epoch_secs"]
        self.best_state = {k: v.detach().clone() for k, v in _weights(self.core.state_dict()).items()}
        self.ema = weight_average(self.core, self.hp)  # restarts from the checkpoint's weights

    def windows(self, jitter: Optional[np.random.Generator], data=None, cuts=None):
        """All-position training windows of ``data`` (default: the run's users)."""
        from slim_ray.rec import data as rd

        data, cuts = (self.data, self.cuts) if data is None else (data, cuts)
        return rd.window_examples(data, self.max_len, cuts, self.spec.get("rationale_protocol", "leaky"),
                                  self.hp.get("window_stride"), jitter=jitter)

    def examples(self, rng: np.random.Generator, data=None, cuts=None):
        """This epoch's training examples of ``data`` (default: the run's users)."""
        from slim_ray.rec import data as rd

        if data is None and self.fixed is not None:
            return self.fixed
        if self.hp["train_on"] == "all_positions":  # window_jitter: new window ends every epoch
            return self.windows(rng if self.hp.get("window_jitter") else None, data, cuts)
        data, cuts = (self.data, self.cuts) if data is None else (data, cuts)
        return rd.prefix_examples(data, self.max_len, self.hp.get("prefixes_per_user"), rng, cuts,
                                  self.spec.get("rationale_protocol", "leaky"))

    def step(self, seq, lens, users, targets, negatives, norm: float, rat=None, has=None, mask=None) -> float:
        """One optimizer step on this worker's part of a batch; returns its summed loss."""
        import torch

        dev = self.device
        loss = self.model(
            torch.as_tensor(seq, device=dev), torch.as_tensor(lens, device=dev), torch.as_tensor(users, device=dev),
            torch.as_tensor(targets, device=dev), negatives.to(dev) if negatives is not None else None, norm=norm,
            rationale=None if rat is None else torch.as_tensor(rat, device=dev),
            has_rationale=None if has is None else torch.as_tensor(has, device=dev),
            rationale_mask=None if mask is None else torch.as_tensor(mask, device=dev), log_q=self.log_q,
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update()
        self.n_steps += 1
        self.total_steps += 1
        return float(loss.detach()) * norm

    def negatives(self, n: int, gen):
        """[n, L, k] per-target negatives (loss=bce), or the [K] a batch shares (sampled_softmax), or None."""
        import torch

        if self.core.loss_kind == "bce":
            return torch.randint(1, self.n_items + 1, (n, self.max_len, int(self.hp["num_negatives"])), generator=gen)
        return self.sampler.draw(gen) if self.sampler is not None else None

    def train_epoch(self, epoch: int) -> float:
        """One pass over the examples; returns the summed loss of the whole global batch stream."""
        import torch

        self.model.train()
        rng = np.random.default_rng([self.seed, epoch])
        ex = self.examples(rng)
        order = rng.permutation(len(ex))
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        gbs, world = int(self.hp["batch_size"]), self.world
        total = 0.0
        self.n_examples = self.n_steps = self.n_targets = 0
        for b in range(0, len(order), gbs):
            gidx = order[b:b + gbs]
            if len(gidx) < world:
                continue  # a tail batch smaller than the world: skipped by every worker alike
            if self.out_of_steps():
                break
            n_tgt = int((ex.targets[gidx] > 0).sum())
            negs = self.negatives(len(gidx), gen)  # drawn for the global batch: the same on every worker
            mine = np.array_split(np.arange(len(gidx)), world)[self.rank]
            if negs is not None and self.core.loss_kind == "bce":
                negs = negs[mine]
            li = gidx[mine]
            rat = has = None
            if self.user_table is not None:
                users = torch.as_tensor(ex.users[li])
                rat, has = self.user_table[0][users], self.user_table[1][users]
            mask = ex.rationale_mask[li] if ex.rationale_mask is not None else None
            total += self.step(ex.seq[li], ex.lens[li], ex.users[li], ex.targets[li], negs, max(1, n_tgt) / world,
                               rat, has, mask)
            self.n_examples += len(gidx)
            self.n_targets += n_tgt
        return total

    def validate(self, metrics: dict[str, Any]) -> bool:
        """Valid NDCG@10 / HR@10 into ``metrics``; True when it improved (best weights kept)."""
        import torch
        import torch.distributed as dist

        self.model.eval()
        if self.ema is not None:
            self.ema.swap()  # score (and keep) the averaged weights
        s = torch.tensor(self.valid_sums(), dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(s)
        ndcg, hr = (s[:2] / max(1.0, float(s[2]))).tolist()
        metrics.update({"valid_ndcg@10": ndcg, "valid_hr@10": hr})
        improved = ndcg > self.best
        if improved:
            self.best, self.best_epoch, self.bad = ndcg, metrics["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in _weights(self.core.state_dict()).items()}
        else:
            self.bad += 1
        if self.ema is not None:
            self.ema.swap()  # training goes on from the weights themselves
        return improved

    def valid_sums(self) -> tuple[float, float, int]:
        """(sum of NDCG@10, sum of HR@10, users) over this worker's validation users."""
        mine = len(np.array_split(np.arange(len(self.valid.users)), self.world)[self.rank])
        return (*valid_ndcg(self.core, self.valid, self.rank, self.world, self.device, self.user_table), mine)

    def decay_on_plateau(self, improved: bool) -> None:
        """Apply ``plateau_lr`` to every parameter group after a validation. The optimizer's state,
        learning rate included, is in every checkpoint, so a resumed run keeps it."""
        for group in self.opt.param_groups:
            group["lr"] = plateau_lr(self.hp, group["lr"], improved, self.bad)

    def report(self, metrics: dict[str, Any], improved: bool) -> None:
        """``ray.train.report`` every validation; rank 0 attaches a checkpoint on improvement."""
        import torch
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if improved and self.rank == 0:
                torch.save({"fingerprint": self.spec["fingerprint"], "model": self.best_state,
                            "optimizer": self.opt.state_dict(), "epoch": metrics["epoch"], "best": self.best,
                            "history": self.history, "epoch_secs": self.epoch_secs,
                            "total_steps": self.total_steps}, os.path.join(d, "state.pt"))
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    def publish(self, run_dir: str, t_start: float, node_ids: list[str]) -> None:
        """Rank 0: the best weights + text tables (self-contained model.pt) and meta.json."""
        state = self.core.state_dict()
        if self.best_state is not None:
            state.update(self.best_state)
        self.add_user_table(state)
        spec = self.spec
        meta = {**{k: spec[k] for k in ("backbone", "mode", "role", "variant", "seed", "hp", "fingerprint",
                                        "missing_rationale", "max_users")},
                "max_steps": spec.get("max_steps"),
                "rationale_protocol": spec.get("rationale_protocol"),
                "inputs": {k: spec.get(k) for k in ("sequences", "items", "item_embeddings", "user_embeddings",
                                                    "rationales")},
                "loss": self.core.loss_kind,
                "full_softmax_logit_bytes": full_softmax_logit_bytes(self.hp, self.n_items),
                "best_epoch": self.best_epoch, "best_valid_ndcg@10": self.best, "history": self.history,
                "epoch_seconds": self.epoch_secs, "wall_seconds": round(time.time() - t_start, 2),
                "fallback_users": self.fallback_count, "fallback_user_ids": self.fallback_ids,
                "world_size": self.world, "device": str(self.device), "node_ids": node_ids,
                "n_users": self.n_users, "n_items": self.n_items, "max_user_id": self.max_user_id,
                "ingest": spec.get("ingest", "memory"), "total_steps": self.total_steps}
        write_run(run_dir, state, meta)
        if getattr(self, "_table_dir", None) is not None:
            self._table_dir.cleanup()

    def add_user_table(self, state: dict) -> None:
        """The per-user rationale table goes into model.pt, so the run folder is self-contained."""
        if self.user_table is not None:
            state["user_text"], state["user_has_text"] = self.user_table


class _StreamRun(_Run):
    """One run on one worker under ``rec.ingest=dataset`` (``slim_ray.rec.ingest``): the users come
    from this worker's shard of the run's Ray Dataset, ``CHUNK_USERS`` at a time.

    Each chunk becomes training examples (windows or prefixes, as in memory) that carry their
    user's rationale vector; the examples left after the last full local batch wait for the next
    chunk. Workers agree after each chunk on how many steps they all can take (one all-reduce of
    two numbers) and on the targets of each of those global steps, so the loss is the global-batch
    mean as in memory mode. The batch order is not the memory mode's (each worker shuffles its own
    shard), so the two modes take different, equally valid steps; the examples still waiting when a
    worker's shard ends (fewer than a local batch per worker, or the imbalance of the shards) are
    not trained on that epoch."""

    CHUNK_USERS = 8192

    def load_inputs(self):
        info = self.spec["_ingest"]
        self.info = info
        self.n_items, self.n_users, self.max_user_id = info["n_items"], info["users"], info["max_user_id"]
        self.fallback_count, self.fallback_ids = info["fallback"], info["fallback_ids"]
        self.user_table = self.cuts = self.fixed = None
        if self.spec["user_embeddings"]:
            import torch

            # the rationale vectors come with each batch: the module only needs their width
            model = new_model(self.spec, self.n_items, torch.zeros((1, info["dim"])), torch.zeros(1, dtype=torch.bool))
            model.pop_user_table()
            return model
        return new_model(self.spec, self.n_items)

    def item_counts(self) -> np.ndarray:
        return np.asarray(self.info["item_counts"], np.int64)

    def _agree(self, values: list[int], op: str):
        """All-reduce a few integers (``min`` or ``sum``) over the worker group."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
        return t.tolist()

    def _chunk_examples(self, chunk, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ex = self.examples(rng, chunk.data, chunk.cuts if self.spec.get("rationale_protocol") == "consistent" else None)
        out = {"seq": ex.seq, "lens": ex.lens, "users": chunk.user_ids[ex.users], "targets": ex.targets}
        if ex.rationale_mask is not None:
            out["mask"] = ex.rationale_mask
        if chunk.vectors is not None:
            out["rat"], out["has"] = chunk.vectors[ex.users], chunk.has[ex.users]
        return out

    def train_epoch(self, epoch: int) -> float:
        import torch
        import ray.train

        from slim_ray.rec.ingest import iter_chunks

        self.model.train()
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        shared_gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)  # the same draws on every worker
        own_gen = torch.Generator().manual_seed((self.seed * 100003 + epoch) * 1009 + self.rank)
        local = max(1, int(self.hp["batch_size"]) // self.world)
        chunks = iter_chunks(ray.train.get_dataset_shard(self.info["train"]), self.n_items, self.CHUNK_USERS,
                             shuffle_buffer=2 * self.CHUNK_USERS)
        total, pending = 0.0, None
        self.n_examples = self.n_steps = self.n_targets = 0
        while not self.out_of_steps():
            chunk = next(chunks, None)
            if chunk is not None:
                ex = self._chunk_examples(chunk, rng)
                pending = ex if pending is None else {k: np.concatenate([pending[k], ex[k]]) for k in ex}
            n = 0 if pending is None else len(pending["lens"])
            k, every_one_has_a_chunk = self._agree([n // local, int(chunk is not None)], "min")
            if self.max_steps is not None:
                k = min(k, int(self.max_steps) - self.total_steps)
            if k:
                order = rng.permutation(n)
                batches = [order[j * local:(j + 1) * local] for j in range(k)]
                targets = self._agree([int((pending["targets"][b] > 0).sum()) for b in batches], "sum")
                for b, n_tgt in zip(batches, targets):
                    negs = self.negatives(len(b), own_gen if self.core.loss_kind == "bce" else shared_gen)
                    total += self.step(pending["seq"][b], pending["lens"][b], pending["users"][b],
                                       pending["targets"][b], negs, max(1, n_tgt) / self.world,
                                       pending["rat"][b] if "rat" in pending else None,
                                       pending["has"][b] if "has" in pending else None,
                                       pending["mask"][b] if "mask" in pending else None)
                    self.n_targets += n_tgt
                self.n_examples += k * local * self.world
                rest = order[k * local:]
                pending = {key: v[rest] for key, v in pending.items()}
            if not every_one_has_a_chunk:
                for _ in chunks:  # a longer shard (rare): finish the Ray Data epoch without steps
                    pass
                break
        return total

    def valid_sums(self) -> tuple[float, float, int]:
        import torch
        import ray.train

        from slim_ray.rec import data as rd
        from slim_ray.rec.ingest import iter_chunks

        ndcg = hr = 0.0
        users = 0
        for chunk in iter_chunks(ray.train.get_dataset_shard(self.info["valid"]), self.n_items, self.CHUNK_USERS):
            split = rd.eval_split(chunk.data, "valid", self.max_len)
            table = None
            if chunk.vectors is not None:  # indexed by the chunk's user numbers, as split.users are
                table = (torch.from_numpy(chunk.vectors), torch.from_numpy(chunk.has))
            n, h = valid_ndcg(self.core, split, 0, 1, self.device, table)
            ndcg, hr, users = ndcg + n, hr + h, users + len(chunk)
        return ndcg, hr, users

    def add_user_table(self, state: dict) -> None:
        """Rank 0 writes the table of every user into model.pt from the user state, through a
        file-backed array (the workers never held it)."""
        if not self.spec["user_embeddings"]:
            return
        from slim_ray.rec.ingest import user_table_file

        self._table_dir = tempfile.TemporaryDirectory(prefix="slim-ray-users-")
        state["user_text"], state["user_has_text"] = user_table_file(
            self.info, os.path.join(self._table_dir.name, "user_text.npy"))


def _peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def train_one(spec: dict[str, Any], run_dir: str) -> None:
    """Train one run (every worker), then rank 0 publishes ``run_dir/model.pt`` + ``meta.json``."""
    import torch
    import torch.distributed as dist

    t_start = time.time()
    run = _StreamRun(spec) if spec.get("ingest") == "dataset" else _Run(spec)
    node_ids = _worker_node_ids(run.world)
    run.resume()
    tag = storage.basename(run_dir)
    epochs = int(run.hp["epochs"])
    for epoch in range(run.start_epoch, epochs):
        t0 = time.time()
        loss_sum = torch.tensor([run.train_epoch(epoch)], dtype=torch.float64)
        if run.world > 1:
            dist.all_reduce(loss_sum)
        secs = time.time() - t0
        run.epoch_secs.append(secs)
        metrics = {"run": tag, "epoch": epoch, "epoch_seconds": secs,
                   "train_loss": float(loss_sum.item() / max(1, run.n_targets)),
                   # for seconds per step and examples/s at scale (bench scale)
                   "steps": run.n_steps, "examples": run.n_examples}
        if (epoch + 1) % int(spec["eval_every"]) and epoch + 1 != epochs and not run.out_of_steps():
            run.history.append(dict(metrics, worker_rss_mib=_peak_rss_mib()))
            continue
        t_valid = time.time()
        improved = run.validate(metrics)
        metrics["valid_seconds"] = time.time() - t_valid  # with epoch_seconds: the time to the best epoch
        metrics["worker_rss_mib"] = _peak_rss_mib()  # this worker's peak so far, validation included
        run.history.append(metrics)
        run.report(metrics, improved)
        run.decay_on_plateau(improved)
        if run.bad >= int(run.hp["patience"]) or run.out_of_steps():
            break
    if run.rank == 0:
        run.publish(run_dir, t_start, node_ids)
    if run.world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- driver side


def is_done(run_dir: str, fingerprint: str) -> bool:
    """A finished run with these settings (see ``slim_ray.rec.checkpoint.is_finished``)."""
    return is_finished(run_dir, fingerprint)


def train_storage(cfg) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) of Ray Train's run storage: ``rec/_ray_train`` of the run
    folder, as a local path, or as a path inside the ``pyarrow.fs`` filesystem of a storage URI
    (the same filesystem, credentials from the environment, that ``slim_ray.storage`` uses)."""
    uri = storage.join(cfg.layout.rec, "_ray_train")
    if storage.is_local(uri):
        return storage.normalize(uri), None
    fs, path = storage.resolve(uri)
    return path, fs


def ingest_inputs(cfg, runs: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """For the runs under ``rec.ingest=dataset``: build (or find) each one's user state in a Ray task,
    attach what its workers need as ``spec["_ingest"]`` (counts and the state's URI; not part of
    the fingerprint), and return the Ray Datasets the trainer splits, by name."""
    import ray

    from slim_ray.rec import data as rd
    from slim_ray.rec.ingest import prepare_state, user_rows

    prepare = ray.remote(num_cpus=0)(prepare_state)
    datasets: dict[str, Any] = {}
    for i, (spec, _) in enumerate(runs):
        if spec.get("ingest") != "dataset":
            continue
        info = ray.get(prepare.remote(storage.normalize(cfg.layout.root), spec, rd.count_items(spec["items"])))
        info["train"], info["valid"] = f"users-{i}", f"users-{i}-valid"
        # two Datasets of the same rows: each split feeds its own loop (training, validation)
        readers = cfg.rec.num_workers  # one map task per worker keeps ahead of its training steps
        datasets[info["train"]], datasets[info["valid"]] = user_rows(info, readers), user_rows(info, readers)
        spec["_ingest"] = info
        logger.warning("[train] %s: %d users through Ray Data (%d without a rationale vector), user state %s",
                       spec["variant"], info["users"], info["fallback"], info["state"])
    return datasets


def fit_sweep(cfg, runs: list[tuple[dict[str, Any], str]]) -> float:
    """Train ``runs`` [(spec, run_dir)] in one Ray Train ``TorchTrainer``; returns its wall seconds.

    ``run_dir`` must be on storage that rank 0's node can write (the run folder, as for every stage).
    Runs under ``rec.ingest=dataset`` get their users as Ray Datasets (``ingest_inputs``), split
    over the workers by the trainer's ``DataConfig`` (equal shards).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slim_ray.runtime import train_backend_config

    rc: RecConfig = cfg.rec
    use_gpu = rc.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= rc.num_workers
    storage_path, storage_fs = train_storage(cfg)
    key = hashlib.sha256("".join(s["fingerprint"] for s, _ in runs).encode()).hexdigest()[:12]
    name = f"sweep-{key}-w{rc.num_workers}"
    t0 = time.time()
    datasets = ingest_inputs(cfg, runs)
    trainer = TorchTrainer(
        sweep_loop,
        train_loop_config={"runs": [(s, storage.normalize(d)) for s, d in runs],
                           "torch_threads": rc.torch_threads or max(1, int(rc.cpus_per_worker))},
        torch_config=train_backend_config(cfg.ray),
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": rc.cpus_per_worker},
                                     placement_strategy=cfg.ray.train_placement),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=1)),
        datasets=datasets or None,
    )
    trainer.fit()
    storage.delete_dir(storage.join(cfg.layout.rec, "_ray_train", name))
    return time.time() - t0
