"""Train the sweep's runs (backbone, variant, seed) on Ray Train (one ``TorchTrainer``, DDP).

Every worker loads the (small) sequences and text vectors itself, draws the same global batch order
from the run's seed, and trains on its contiguous slice of each global batch. The loss is summed
and divided by (targets in the global batch / world size), so DDP's gradient average equals the
gradient of the global-batch mean: 1 worker and N workers take the same steps (up to dropout
noise and float rounding). Sampled negatives (loss=bce) are drawn for the global batch too.

Validation (full ranking NDCG@10 on the valid target) is sharded over workers and all-reduced, so
every worker takes the same early-stopping decision. Each improvement is reported with a
checkpoint through ``ray.train.report`` (weights without the frozen text buffers + optimizer),
from which a restarted worker group resumes the run (``FailureConfig(max_failures=1)``). When a
run ends, rank 0 writes ``rec/<run>/model.pt`` (best weights + text buffers: self-contained) and
``meta.json`` (settings, fingerprint, training log, fallback users); finished runs are skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import numpy as np
import yaml

from slim_ray.rec.config import RecConfig, variant_name

logger = logging.getLogger(__name__)

DEFAULTS_DIR = os.path.join(os.path.dirname(__file__), "defaults")
EXPLICIT = ("epochs", "patience", "loss", "num_negatives", "batch_size", "lr", "max_len", "hidden")
# rec.params keys every backbone accepts without a YAML default (absent: the behaviour named here)
OPTIONAL_PARAMS = {
    "prefixes_per_user": "with train_on=prefixes: every prefix of every user",
    "linear_init_std": "PyTorch's default initialisation of every linear and attention layer",
}
TRAIN_ON = ("all_positions", "prefixes")


def backbone_defaults(backbone: str) -> dict[str, Any]:
    with open(os.path.join(DEFAULTS_DIR, f"{backbone}.yaml")) as f:
        return yaml.safe_load(f)


def resolve_hparams(rc: RecConfig, backbone: str) -> dict[str, Any]:
    """Backbone YAML < explicit rec.* fields < rec.params. Unknown params are an error."""
    hp = backbone_defaults(backbone)
    for k in EXPLICIT:
        v = getattr(rc, k)
        if v is not None:
            hp[k] = v
    unknown = sorted(set(rc.params) - set(hp) - set(OPTIONAL_PARAMS))
    if unknown:
        raise ValueError(f"rec.params: unknown key(s) {unknown} for backbone {backbone} "
                         f"(known: {', '.join(sorted(set(hp) | set(OPTIONAL_PARAMS)))})")
    hp.update(rc.params)
    if hp["train_on"] not in TRAIN_ON:
        raise ValueError(f"rec.params.train_on={hp['train_on']!r} for backbone {backbone}: "
                         f"expected one of {', '.join(TRAIN_ON)}")
    return hp


def run_spec(cfg, backbone: str, mode: str, role: Optional[str], seed: int) -> dict[str, Any]:
    """Everything one run needs, as plain JSON (shipped to the Ray Train workers)."""
    rc: RecConfig = cfg.rec
    lay = cfg.layout
    spec = {
        "backbone": backbone, "mode": mode, "role": role, "variant": variant_name(mode, role),
        "seed": int(seed), "hp": resolve_hparams(rc, backbone),
        "sequences": os.path.abspath(lay.sequences), "items": os.path.abspath(lay.items),
        "item_embeddings": os.path.abspath(lay.item_embeddings) if mode != "id" else None,
        "user_embeddings": os.path.abspath(lay.user_embeddings(role)) if role else None,
        "missing_rationale": rc.missing_rationale, "max_users": rc.max_users,
        "eval_every": rc.eval_every,
    }
    spec["fingerprint"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec


# --------------------------------------------------------------------------- building blocks


def build_model(spec: dict[str, Any], data):
    """The SeqRec model of a spec, plus the ids of users that fall back to no rationale."""
    import torch

    from slim_ray.rec import data as rd
    from slim_ray.rec.fusion import SeqRec

    item_text = user_text = has = None
    fallback: list[int] = []
    if spec["item_embeddings"]:
        item_text = torch.from_numpy(rd.item_text_table(spec["item_embeddings"], data.n_items))
    if spec["user_embeddings"]:
        ut, has_np, fallback = rd.user_text_table(spec["user_embeddings"], data.user_ids, data.n_users,
                                                  spec["missing_rationale"])
        user_text, has = torch.from_numpy(ut), torch.from_numpy(has_np)
    model = SeqRec(spec["backbone"], spec["mode"], spec["hp"], data.n_items, item_text, user_text, has,
                   spec["missing_rationale"])
    return model, fallback


def load_data(spec: dict[str, Any]):
    from slim_ray.rec import data as rd

    n_items = rd.count_items(spec["items"])
    return rd.load_sequences(spec["sequences"], spec["max_users"], n_items)


def valid_ndcg(model, split, rank: int, world: int, device, k: int = 10) -> tuple[float, float]:
    """(sum of NDCG@k, sum of HR@k) over this worker's shard of the validation users."""
    import torch

    from slim_ray.rec.metrics import evaluate_vectors

    idx = np.arange(rank, len(split.users), world)
    if not len(idx):
        return 0.0, 0.0
    sub = _subset(split, idx)
    with torch.no_grad():
        table = model.item_table()
        uv = model.last_user_vectors(torch.as_tensor(sub.seq, device=device), torch.as_tensor(sub.lens, device=device),
                                     torch.as_tensor(sub.users, device=device), table)
        m = evaluate_vectors(uv, table, sub, [k])["full"]
    return float(m[f"ndcg@{k}"].sum()), float(m[f"hr@{k}"].sum())


def _subset(split, idx: np.ndarray):
    from slim_ray.rec.data import EvalSplit

    pos = np.full(len(split.users), -1)
    pos[idx] = np.arange(len(idx))
    keep = pos[split.excl_rows] >= 0
    return EvalSplit(split.users[idx], split.seq[idx], split.lens[idx], split.targets[idx],
                     pos[split.excl_rows[keep]], split.excl_cols[keep], split.n_candidates[idx])


# --------------------------------------------------------------------------- the worker loop

BUFFERS = ("item_text", "user_text", "user_has_text")


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
        if is_done(run_dir, spec["fingerprint"]):
            continue
        train_one(spec, run_dir)


def train_one(spec: dict[str, Any], run_dir: str) -> None:
    """Train one run (every worker), then rank 0 writes ``run_dir/model.pt`` + ``meta.json``."""
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from slim_ray.rec import data as rd

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hp, seed = spec["hp"], spec["seed"]
    t_start = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    data = load_data(spec)
    model, fallback = build_model(spec, data)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = next(core.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    max_len = int(hp["max_len"])
    valid = rd.eval_split(data, "valid", max_len)
    fixed = rd.window_examples(data, max_len) if hp["train_on"] == "all_positions" else None

    start_epoch, best, best_epoch, bad, history, epoch_secs = 0, -1.0, -1, 0, [], []
    best_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group: resume this run if the checkpoint is its own
        with ckpt.as_directory() as d:
            path = os.path.join(d, "state.pt")
            st = torch.load(path, map_location=device, weights_only=False) if os.path.exists(path) else None
        if st is not None and st.get("fingerprint") == spec["fingerprint"]:
            core.load_state_dict(st["model"], strict=False)
            opt.load_state_dict(st["optimizer"])
            start_epoch, best, best_epoch = st["epoch"] + 1, st["best"], st["epoch"]
            history, epoch_secs = st["history"], st["epoch_secs"]
            best_state = {k: v.detach().clone() for k, v in _weights(core.state_dict()).items()}

    gbs = int(hp["batch_size"])
    n_items, k_neg = data.n_items, int(hp["num_negatives"])
    tag = os.path.basename(run_dir.rstrip("/"))
    for epoch in range(start_epoch, int(hp["epochs"])):
        t0 = time.time()
        model.train()
        rng = np.random.default_rng([seed, epoch])
        ex = fixed if fixed is not None else rd.prefix_examples(data, max_len, hp.get("prefixes_per_user"), rng)
        order = rng.permutation(len(ex))
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        total = 0.0
        for b in range(0, len(order), gbs):
            gidx = order[b:b + gbs]
            if len(gidx) < world:
                continue  # a tail batch smaller than the world: skipped by every worker alike
            gt = ex.targets[gidx]
            n_tgt = int((gt > 0).sum())
            negs = None
            if hp["loss"] == "bce":
                negs = torch.randint(1, n_items + 1, (len(gidx), max_len, k_neg), generator=gen)
            mine = np.array_split(np.arange(len(gidx)), world)[rank]
            li = gidx[mine]
            loss = model(
                torch.as_tensor(ex.seq[li], device=device), torch.as_tensor(ex.lens[li], device=device),
                torch.as_tensor(ex.users[li], device=device), torch.as_tensor(ex.targets[li], device=device),
                negs[mine].to(device) if negs is not None else None, norm=max(1, n_tgt) / world,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * max(1, n_tgt) / world
        loss_sum = torch.tensor([total], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(loss_sum)
        secs = time.time() - t0
        epoch_secs.append(secs)
        metrics = {"run": tag, "epoch": epoch, "epoch_seconds": secs,
                   "train_loss": float(loss_sum.item() / max(1, int((ex.targets > 0).sum())))}
        if (epoch + 1) % int(spec["eval_every"]) and epoch + 1 != int(hp["epochs"]):
            history.append(metrics)
            continue
        model.eval()
        s = torch.tensor(valid_ndcg(core, valid, rank, world, device), dtype=torch.float64)
        if world > 1:
            dist.all_reduce(s)
        ndcg, hr = (s / len(valid.users)).tolist()
        metrics.update({"valid_ndcg@10": ndcg, "valid_hr@10": hr})
        history.append(metrics)
        improved = ndcg > best
        if improved:
            best, best_epoch, bad = ndcg, epoch, 0
            best_state = {k: v.detach().clone() for k, v in _weights(core.state_dict()).items()}
        else:
            bad += 1
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if improved and rank == 0:
                torch.save({"fingerprint": spec["fingerprint"], "model": best_state, "optimizer": opt.state_dict(),
                            "epoch": epoch, "best": best, "history": history, "epoch_secs": epoch_secs},
                           os.path.join(d, "state.pt"))
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if bad >= int(hp["patience"]):
            break

    if rank == 0:  # the best weights (+ text buffers, so the folder is self-contained) and the log
        state = core.state_dict()
        if best_state is not None:
            state.update(best_state)
        os.makedirs(run_dir, exist_ok=True)
        torch.save(state, os.path.join(run_dir, "model.pt.tmp"))
        os.replace(os.path.join(run_dir, "model.pt.tmp"), os.path.join(run_dir, "model.pt"))
        meta = {**{k: spec[k] for k in ("backbone", "mode", "role", "variant", "seed", "hp", "fingerprint",
                                        "missing_rationale", "max_users")},
                "inputs": {k: spec[k] for k in ("sequences", "items", "item_embeddings", "user_embeddings")},
                "best_epoch": best_epoch, "best_valid_ndcg@10": best, "history": history,
                "epoch_seconds": epoch_secs, "wall_seconds": round(time.time() - t_start, 2),
                "fallback_users": len(fallback), "fallback_user_ids": fallback[:20],
                "world_size": world, "device": str(device),
                "n_users": len(data), "n_items": data.n_items, "max_user_id": data.n_users}
        with open(os.path.join(run_dir, "meta.json.tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(run_dir, "meta.json.tmp"), os.path.join(run_dir, "meta.json"))
    if world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- driver side


def is_done(run_dir: str, fingerprint: str) -> bool:
    try:
        with open(os.path.join(run_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and os.path.exists(os.path.join(run_dir, "model.pt"))


def fit_sweep(cfg, runs: list[tuple[dict[str, Any], str]]) -> float:
    """Train ``runs`` [(spec, run_dir)] in one Ray Train ``TorchTrainer``; returns its wall seconds.

    ``run_dir`` must be on storage that rank 0's node can write (the run folder, as for every stage).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slim_ray.runtime import train_backend_config

    rc: RecConfig = cfg.rec
    use_gpu = rc.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= rc.num_workers
    storage = os.path.abspath(os.path.join(cfg.layout.rec, "_ray_train"))
    key = hashlib.sha256("".join(s["fingerprint"] for s, _ in runs).encode()).hexdigest()[:12]
    name = f"sweep-{key}-w{rc.num_workers}"
    t0 = time.time()
    trainer = TorchTrainer(
        sweep_loop,
        train_loop_config={"runs": [(s, os.path.abspath(d)) for s, d in runs],
                           "torch_threads": rc.torch_threads or max(1, int(rc.cpus_per_worker))},
        torch_config=train_backend_config(cfg.ray),
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": rc.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=1)),
    )
    trainer.fit()
    shutil.rmtree(os.path.join(storage, name), ignore_errors=True)
    return time.time() - t0


def load_run(run_dir: str, map_location: str = "cpu"):
    """(model in eval mode, meta) of a finished run folder, rebuilt without the embeddings folders
    (the text vectors are buffers inside model.pt)."""
    import torch

    from slim_ray.rec.fusion import SeqRec

    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    state = torch.load(os.path.join(run_dir, "model.pt"), map_location=map_location, weights_only=True)
    item_text = state.get("item_text")
    user_text = state.get("user_text")
    has = state.get("user_has_text")
    model = SeqRec(meta["backbone"], meta["mode"], meta["hp"], meta["n_items"], item_text, user_text, has,
                   meta["missing_rationale"])
    model.load_state_dict(state)
    model.eval()
    return model, meta
