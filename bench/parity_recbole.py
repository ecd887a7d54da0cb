"""Peer parity: RecBole's own SASRec vs ours on MovieLens-100K, same split, full ranking.

    .venv/bin/python bench/parity_recbole.py [--epochs 200] [--patience 10] [--seeds 0 1 2]
        [--recbole-seeds 0] [--recbole-epochs 14] [--recbole-batch 256]

What is compared, side by side in one run:
- the same leave-one-out split: our ``sequences`` (time order, ties by file row) are written as a
  RecBole atomic file whose timestamps are the positions 0..n-1, so RecBole's ``LS`` split
  (``valid_and_test``, ``order: TO``, ``group_by: user``) cuts exactly where ours does;
- the same protocol: full ranking over every item not in the user's history, NDCG@10 / HR@10 on
  the test target, best epoch by valid NDCG@10 (early stopping);
- the same model settings: RecBole's SASRec defaults (2 blocks, 2 heads, hidden 64, inner 256,
  dropout 0.5, max length 50, CE loss over all items, Adam 1e-3). RecBole trains on every prefix
  (batch 2048, its default); ours on windows with a loss at every position (batch 64, the SASRec
  YAML default).

RecBole 1.2.1 is installed in the main venv with --no-deps; it also needs colorlog, colorama,
texttable and tensorboard, which this script installs into its own venv (.cache/venv-recbole,
which reuses the main venv's torch/numpy/pandas through a .pth file) -- never into the main venv.
Two shims make 1.2.1 run on today's stack, applied in the RecBole process only: numpy 2 removed
the ``np.float_``-style aliases RecBole's config sets, and torch >= 2.6 loads checkpoints with
``weights_only=True``, which RecBole's own (trusted) best-model checkpoint does not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".cache", "venv-recbole")
EXTRA = ["colorlog==6.12.0", "colorama==0.4.6", "texttable==1.7.2", "tensorboard==2.21.0"]
RECBOLE = {  # RecBole's SASRec defaults, spelled out
    "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
    "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": 50, "learning_rate": 0.001, "train_batch_size": 2048,
}


def ensure_venv() -> str:
    py = os.path.join(VENV, "bin", "python")
    marker = os.path.join(VENV, ".ready")
    if os.path.exists(marker):
        return py
    import site

    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    sp = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
    main_sp = [p for p in site.getsitepackages() if p.startswith(os.path.join(ROOT, ".venv"))][0]
    with open(os.path.join(sp, "main_venv.pth"), "w") as f:
        f.write(main_sp + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", *EXTRA], check=True)
    open(marker, "w").close()
    return py


def write_atomic(seq_path: str, out_dir: str, name: str) -> None:
    """Our sequences -> RecBole atomic .inter (timestamp = position: the split is ours exactly)."""
    from slim_ray.data.io import read_sequences

    t = read_sequences(seq_path, columns=["user_id", "item_ids"])
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    with open(os.path.join(out_dir, name, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, items in zip(t.column("user_id").to_pylist(), t.column("item_ids").to_pylist()):
            for pos, i in enumerate(items):
                f.write(f"{u}\t{i}\t{pos}\n")


# --------------------------------------------------------------------------- RecBole side


def recbole_worker(data_dir: str, name: str, seed: int, epochs: int, patience: int, out: str,
                   batch_size: int = RECBOLE["train_batch_size"]) -> None:
    import numpy as np

    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, old):
            setattr(np, old, new)
    import torch

    _load = torch.load
    torch.load = lambda *a, **k: _load(*a, **{**k, "weights_only": False})
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "2")))
    cfg = {
        "data_path": data_dir, "dataset": name, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "train_neg_sample_args": None,
        "epochs": epochs, "stopping_step": patience, "eval_batch_size": 4096, "seed": seed,
        "reproducibility": True, "device": "cpu", "use_gpu": False, "show_progress": False,
        "checkpoint_dir": os.path.join(data_dir, f"saved-{seed}"), "log_wandb": False, "worker": 0, **RECBOLE,
        "train_batch_size": batch_size,
    }
    config = Config(model="SASRec", config_dict=cfg)
    init_logger(config)  # RecBole's own per-epoch log (stdout + ./log/ under the work dir)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    print(f"[recbole] data ready: {dataset.user_num - 1} users, {dataset.item_num - 1} items, "
          f"{len(train.dataset)} training prefixes", flush=True)
    model = SASRec(config, train.dataset).to(config["device"])
    trainer = Trainer(config, model)
    train_secs, train_cpu = [], []
    inner = trainer._train_epoch

    def timed(*a, **k):  # wall and CPU seconds (the latter does not depend on other load)
        t0, c0 = time.time(), time.process_time()
        r = inner(*a, **k)
        train_secs.append(time.time() - t0)
        train_cpu.append(time.process_time() - c0)
        print(f"[recbole] epoch {len(train_secs) - 1}: {train_secs[-1]:.1f}s wall, {train_cpu[-1]:.1f} CPU-s", flush=True)
        return r

    trainer._train_epoch = timed
    valid_history: list[float] = []
    inner_valid = trainer._valid_epoch

    def recorded(*a, **k):  # the learning curve, also written after every epoch (a cut run keeps it)
        score, result = inner_valid(*a, **k)
        valid_history.append(float(score))
        with open(out + ".partial", "w") as f:
            json.dump({"valid_ndcg@10_history": valid_history, "epoch_seconds": train_secs,
                       "epoch_cpu_seconds": train_cpu}, f)
        return score, result

    trainer._valid_epoch = recorded
    trainer.fit(train, valid, saved=True, show_progress=False)
    res = trainer.evaluate(test, load_best_model=True, show_progress=False)
    with open(out, "w") as f:
        json.dump({"ndcg@10": float(res["ndcg@10"]), "hr@10": float(res["hit@10"]),
                   "best_epoch": len(train_secs) - 1 - int(trainer.cur_step),
                   "epochs": len(train_secs), "epoch_seconds": sum(train_secs) / max(1, len(train_secs)),
                   "epoch_cpu_seconds": sum(train_cpu) / max(1, len(train_cpu)), "train_batch_size": batch_size,
                   "valid_ndcg@10_history": valid_history,
                   "n_users": int(dataset.user_num - 1), "n_items": int(dataset.item_num - 1)}, f)


# --------------------------------------------------------------------------- our side


def ours(run_dir: str, seeds: list[int], epochs: int, patience: int) -> dict:
    from slim_ray.config import load_config
    from slim_ray.rec.stage import run_evaluate, run_train

    cfg = load_config(None, [
        f"run_dir={run_dir}", "rec.backbone=sasrec", "rec.mode=id", f"rec.seeds={seeds}", f"rec.epochs={epochs}",
        f"rec.patience={patience}", "rec.max_len=50", "rec.loss=softmax", "rec.lr=0.001", "rec.hidden=64",
        "rec.params={dropout: 0.5, num_layers: 2, num_heads: 2, inner: 256}", "evaluate.protocols=[full]",
        "ray.num_cpus=2",
    ])
    run_train(cfg)
    m = run_evaluate(cfg)
    with open(os.path.join(cfg.layout.eval, "metrics.json")) as f:
        e = json.load(f)["results"]["sasrec"]["id"]
    history = {}
    for s in seeds:
        with open(os.path.join(cfg.layout.rec_run("sasrec", "id", s, None), "meta.json")) as f:
            history[str(s)] = [h["valid_ndcg@10"] for h in json.load(f)["history"]]
    return {"per_seed": {s: e["per_seed"][s]["full"] for s in e["per_seed"]},
            "epoch_seconds": e["mean_epoch_seconds"], "best_epoch": e["best_epoch"],
            "valid_ndcg@10_history": history}


def load_recbole(out: str) -> dict:
    """A finished RecBole result, or the learning curve of a run that was stopped (``cut``)."""
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    with open(out + ".partial") as f:
        part = json.load(f)
    return {**part, "cut": True, "epochs": len(part["valid_ndcg@10_history"])}


def print_curves(theirs_seed: dict, mine: dict, seed: str) -> None:
    """Valid NDCG@10 after each epoch, side by side (an epoch: one pass over the same targets)."""
    if seed not in mine["valid_ndcg@10_history"]:
        return
    theirs_h, ours_h = theirs_seed["valid_ndcg@10_history"], mine["valid_ndcg@10_history"][seed]
    print(f"\nvalid NDCG@10 (full ranking) after each epoch, seed {seed}:\n{'epoch':>6s}{'RecBole':>10s}{'ours':>10s}")
    for ep in range(max(len(theirs_h), len(ours_h))):
        cell = lambda h: f"{h[ep]:10.4f}" if ep < len(h) else f"{'':>10s}"  # noqa: E731
        print(f"{ep + 1:6d}{cell(theirs_h)}{cell(ours_h)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default=None, help="sequences contract (default: build from the packaged ML-100K "
                    "via the prepared run at runs/shared-ml100k if present)")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recbole-epochs", type=int, default=None,
                    help="epoch cap of the RecBole side (default: --epochs)")
    ap.add_argument("--recbole-seeds", type=int, nargs="+", default=None,
                    help="seeds of the RecBole side (default: --seeds); one RecBole epoch trains every prefix, "
                    "about 4 min on 2 cores")
    ap.add_argument("--recbole-batch", type=int, default=RECBOLE["train_batch_size"],
                    help="RecBole's train_batch_size (its default 2048 gives 41 steps per epoch over the 82,626 "
                    "ML-100K training prefixes; a smaller one takes more steps per epoch, so fewer epochs)")
    ap.add_argument("--reuse-recbole", action="store_true",
                    help="use RecBole results already in --workdir, including the curve of a run that was "
                    "stopped (recbole-s<seed>.json.partial), instead of training RecBole again")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench-parity"))
    ap.add_argument("--recbole-worker", nargs=7, metavar=("DATA", "NAME", "SEED", "EPOCHS", "PATIENCE", "OUT", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.recbole_worker:
        d, n, s, e, p, o, b = args.recbole_worker
        recbole_worker(d, n, int(s), int(e), int(p), o, int(b))
        return 0

    seq = args.sequences or os.path.join(ROOT, "runs", "shared-ml100k", "prepared", "sequences")
    if not os.path.exists(seq):
        raise SystemExit(f"{seq}: no prepared MovieLens-100K (run `slim-ray prepare` or pass --sequences)")
    os.makedirs(args.workdir, exist_ok=True)
    run_dir = os.path.join(args.workdir, "ours")
    prepared = os.path.join(run_dir, "prepared")
    if not os.path.exists(prepared):
        os.makedirs(run_dir, exist_ok=True)
        os.symlink(os.path.dirname(os.path.abspath(seq)), prepared)
    py = ensure_venv()
    name = "ml100k_loo"
    write_atomic(seq, args.workdir, name)

    recbole_seeds = args.recbole_seeds or args.seeds
    theirs = {}
    for s in recbole_seeds:
        out = os.path.join(args.workdir, f"recbole-s{s}.json")
        if args.reuse_recbole and (os.path.exists(out) or os.path.exists(out + ".partial")):
            theirs[str(s)] = load_recbole(out)
            continue
        t0 = time.time()
        subprocess.run([py, os.path.abspath(__file__), "--recbole-worker", args.workdir, name, str(s),
                        str(args.recbole_epochs or args.epochs), str(args.patience), out, str(args.recbole_batch)],
                       check=True, cwd=args.workdir)
        with open(out) as f:
            theirs[str(s)] = json.load(f)
        print(f"[recbole] seed {s}: {theirs[str(s)]}  ({time.time() - t0:.0f}s)", flush=True)
    mine = ours(run_dir, args.seeds, args.epochs, args.patience)
    cut = [s for s in recbole_seeds if theirs[str(s)].get("cut")]
    if cut:
        print_curves(theirs[str(cut[0])], mine, str(cut[0]))
        print(f"\nRecBole seed(s) {cut} were stopped before early stopping ended them: no test figure to "
              "compare; the curves above are the comparison (both on the same validation targets).")
        with open(os.path.join(args.workdir, "parity.json"), "w") as f:
            json.dump({"recbole": theirs, "ours": mine}, f, indent=1)
        return 0

    import numpy as np

    def mean(xs):
        return float(np.mean(xs))

    r_ndcg = mean([theirs[str(s)]["ndcg@10"] for s in recbole_seeds])
    o_ndcg = mean([mine["per_seed"][str(s)]["ndcg@10"] for s in args.seeds])
    r_hr = mean([theirs[str(s)]["hr@10"] for s in recbole_seeds])
    o_hr = mean([mine["per_seed"][str(s)]["hr@10"] for s in args.seeds])
    r_ep = mean([theirs[str(s)]["epoch_seconds"] for s in recbole_seeds])
    o_ep = mean([x for x in mine["epoch_seconds"] if x is not None])
    print(f"\nMovieLens-100K, leave-one-out, full ranking, SASRec; RecBole seeds {recbole_seeds}, ours {args.seeds}")
    print(f"{'':22s}{'NDCG@10':>10s}{'HR@10':>10s}{'s/epoch':>10s}{'epochs':>10s}")
    print(f"{'RecBole 1.2.1 SASRec':22s}{r_ndcg:10.4f}{r_hr:10.4f}{r_ep:10.2f}"
          f"{mean([theirs[str(s)]['epochs'] for s in recbole_seeds]):10.1f}")
    print(f"{'slim_ray SASRec':22s}{o_ndcg:10.4f}{o_hr:10.4f}{o_ep:10.2f}{'':>10s}")
    print(f"RecBole CPU-seconds per epoch (load-independent): "
          f"{mean([theirs[str(s)].get('epoch_cpu_seconds', float('nan')) for s in recbole_seeds]):.1f}; "
          f"RecBole batch {theirs[str(recbole_seeds[0])].get('train_batch_size')}, best epochs "
          f"{[theirs[str(s)]['best_epoch'] for s in recbole_seeds]}; ours best epochs {mine['best_epoch']}")
    print_curves(theirs[str(recbole_seeds[0])], mine, str(recbole_seeds[0]))
    rel = o_ndcg / r_ndcg - 1
    print(f"\nNDCG@10 ours/RecBole - 1 = {100 * rel:+.1f}% (target within +-5%); "
          f"HR@10 {100 * (o_hr / r_hr - 1):+.1f}%; epoch time ours/RecBole = {o_ep / r_ep:.2f}x "
          "(an epoch: RecBole one pass over every prefix, ours one pass over every window)")
    with open(os.path.join(args.workdir, "parity.json"), "w") as f:
        json.dump({"recbole": theirs, "ours": mine, "ndcg_rel_diff": rel}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
