"""Peer parity: RecBole's own SASRec vs ours on MovieLens-100K, same split, full ranking.

    .venv/bin/python bench/parity_recbole.py [--epochs 200] [--patience 10] [--seeds 0 1 2]
        [--recbole-seeds 0] [--recbole-epochs 14] [--recbole-batch 256] [--regimes prefixes windows]

What is compared, side by side in one run:
- the same leave-one-out split: our ``sequences`` (time order, ties by file row) are written as a
  RecBole atomic file whose timestamps are the positions 0..n-1, so RecBole's ``LS`` split
  (``valid_and_test``, ``order: TO``, ``group_by: user``) cuts exactly where ours does;
- the same protocol: full ranking over every item not in the user's history, NDCG@10 / HR@10 on
  the test target, best epoch by valid NDCG@10 (early stopping). RecBole's own full-sort
  evaluation of a *sequential* model ranks all items, the user's history included (it passes no
  history index for sequential models). So the RecBole side is also scored here
  (``protocol_metrics``) on our protocol, and its early stopping follows that valid NDCG@10; the
  same function without the exclusion must reproduce RecBole's evaluator (checked at the end of
  every RecBole run), and RecBole's own-protocol figures are kept beside ours;
- the same model settings: RecBole's SASRec defaults (2 blocks, 2 heads, hidden 64, inner 256,
  dropout 0.5, max length 50, CE loss over all items, Adam 1e-3).

Ours is trained in up to six regimes (``--regimes``), each its own run folder under the work dir:
- ``prefixes`` (``ours-prefixes/``): RecBole's own regime -- every training prefix is one example
  whose last position predicts the next item, batch ``--recbole-batch``. Same data, objective and
  batch as RecBole: the closest pair; like RecBole's process it computes with 2 threads (about
  1.5x RecBole's time per epoch, so it takes long on 2 cores);
- ``windows`` (``ours/``): our SASRec default (slim_ray/rec/defaults/sasrec.yaml) -- windows of
  max length with a loss at every position (the original SASRec objective) that overlap by
  ``max_len - window_stride`` items, so every target is predicted from at least 25 earlier items;
  each epoch shifts every user's window ends anew (``window_jitter``), and validation scores, and
  the run keeps, a moving average of the weights (``ema_decay: 0.99``); the learning rate halves
  after every 2 validations in a row without a better one (``lr_plateau_factor: 0.5``); batch 16, 2 threads like
  RecBole's process. It sees the same next-item targets per epoch at a
  small fraction of the transformer work. Parity above RecBole is checked on this, what users run:
  test NDCG@10 at least RecBole's, in at most a tenth of RecBole's time to its best epoch;
- ``windows-plain`` (``ours-plain/``): the default before ``window_jitter``, ``ema_decay`` and
  ``lr_plateau_factor``: the same windows every epoch, validation scores the weights themselves,
  and the learning rate stays constant;
- ``windows-tiled`` (``ours-tiled/``): the default before it -- windows that do not overlap, batch
  64, 1 thread;
- ``prefixes-init`` / ``windows-init``: the same with RecBole's weight initialisation (every linear
  and attention weight N(0, 0.02), zero biases; ``rec.params.linear_init_std``) instead of
  PyTorch's defaults (both initialise embeddings N(0, 0.02)). The other differences left: torch's
  encoder layer adds a dropout after the feed-forward activation, and our softmax leaves out the
  padding item.

RecBole 1.2.1 is installed in the main venv with --no-deps; it also needs colorlog, colorama,
texttable and tensorboard, which this script installs into its own venv (.cache/venv-recbole,
which reuses the main venv's torch/numpy/pandas through a .pth file) -- never into the main venv.
Two shims make 1.2.1 run on today's stack, applied in the RecBole process only: numpy 2 removed
the ``np.float_``-style aliases RecBole's config sets, and torch >= 2.6 loads checkpoints with
``weights_only=True``, which RecBole's own (trusted) best-model checkpoint does not pass. A third
keeps timing honest: importing RecBole's models switches on autograd anomaly detection for the
whole process (``set_detect_anomaly(True)`` at the top of its ``sine.py``), a debugging mode that
made each SASRec epoch 2.5x slower at the start and slower with every epoch; it is switched back
off, which changes no number (same valid NDCG@10 per epoch with it on and off).
"""

from __future__ import annotations

import os
import sys

# RecBole's own venv (the --recbole-worker process) sees the main venv's packages through a .pth
# file, which does not carry the editable install of this checkout: put the checkout first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slim_ray.runtime import pin_loopback  # noqa: E402

pin_loopback()  # before anything imports Ray: a local Ray listens on 127.0.0.1 only

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


def read_atomic(path: str) -> dict[str, list[str]]:
    """user token -> item tokens in position order, from the atomic file ``write_atomic`` wrote."""
    rows: dict[str, list[tuple[float, str]]] = {}
    with open(path) as f:
        next(f)
        for line in f:
            u, i, t = line.rstrip("\n").split("\t")
            rows.setdefault(u, []).append((float(t), i))
    return {u: [i for _, i in sorted(r)] for u, r in rows.items()}


def protocol_metrics(model, seqs: list, split: str, exclude_history: bool) -> dict[str, float]:
    """NDCG@10 / HR@10 of a RecBole sequential model, computed by slim_ray's evaluator, not RecBole's.

    ``seqs``: every user's whole sequence in RecBole's internal item ids; ``split`` ``valid`` or
    ``test``. The inputs, targets and history come from our ``eval_split`` and the ranks from our
    ``ranks_full``, so with ``exclude_history`` this is our protocol exactly. Without it every item
    is ranked, which is what RecBole's full-sort evaluation does for sequential models (it passes no
    history index for them), so that number must equal RecBole's.
    """
    import numpy as np
    import torch

    from slim_ray.rec import data as rd
    from slim_ray.rec.metrics import metrics_from_ranks, ranks_full

    n_items = max(max(s) for s in seqs)  # only feeds eval_split's candidate counts, unused here
    data = rd.RecData(np.arange(1, len(seqs) + 1), [np.asarray(s, dtype=np.int64) for s in seqs], n_items, len(seqs))
    ev = rd.eval_split(data, split, model.max_seq_length)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict({model.ITEM_SEQ: torch.as_tensor(ev.seq),
                                          model.ITEM_SEQ_LEN: torch.as_tensor(ev.lens)}).view(len(seqs), -1)
    model.train(was_training)
    excl = (torch.as_tensor(ev.excl_rows), torch.as_tensor(ev.excl_cols)) if exclude_history else (None, None)
    ranks = ranks_full(scores, torch.as_tensor(ev.targets), *excl)
    m = metrics_from_ranks(ranks.numpy(), [10])
    return {"ndcg@10": float(m["ndcg@10"].mean()), "hr@10": float(m["hr@10"].mean())}


def seconds_to_best(train_secs: list[float], valid_secs: list[float], best_epoch: int) -> float:
    """Wall seconds of training and validation up to and including the best epoch (0-based): what
    early stopping needed to reach the weights it keeps (data loading and start-up left out, both sides)."""
    return float(sum(train_secs[:best_epoch + 1]) + sum(valid_secs[:best_epoch + 1]))


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

    # Importing RecBole's sequential models runs `torch.autograd.set_detect_anomaly(True)` (a debugging
    # switch at the top of its sine.py) for the whole process: every op then records a Python stack
    # and every backward checks for NaN, which made SASRec's epochs 10-50x slower and growing. It is
    # no part of SASRec's training; switch it back off.
    torch.autograd.set_detect_anomaly(False)
    sys.path.insert(0, ROOT)  # this venv sees the main venv's packages, not the slim_ray checkout
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
    seqs = [list(dataset.token2id("item_id", items)) for items in
            read_atomic(os.path.join(data_dir, name, f"{name}.inter")).values()]
    train_secs, train_cpu = [], []
    inner = trainer._train_epoch

    def timed(*a, **k):  # wall and CPU seconds (both grow when other jobs share the cores)
        t0, c0 = time.time(), time.process_time()
        r = inner(*a, **k)
        train_secs.append(time.time() - t0)
        train_cpu.append(time.process_time() - c0)
        print(f"[recbole] epoch {len(train_secs) - 1}: {train_secs[-1]:.1f}s wall, {train_cpu[-1]:.1f} CPU-s", flush=True)
        return r

    trainer._train_epoch = timed
    valid_history: list[float] = []  # our protocol: early stopping and the best epoch follow it
    valid_history_recbole: list[float] = []  # RecBole's own protocol (all items ranked)
    valid_secs: list[float] = []  # RecBole's own validation pass (our protocol's scoring is not timed)
    inner_valid = trainer._valid_epoch

    def recorded(*a, **k):  # the learning curve, also written after every epoch (a cut run keeps it)
        t0 = time.time()
        score, result = inner_valid(*a, **k)
        valid_secs.append(time.time() - t0)
        valid_history_recbole.append(float(score))
        valid_history.append(protocol_metrics(trainer.model, seqs, "valid", exclude_history=True)["ndcg@10"])
        print(f"[recbole] valid NDCG@10: {valid_history[-1]:.4f} (history excluded), {score:.4f} (RecBole's "
              "protocol, all items)", flush=True)
        with open(out + ".partial", "w") as f:
            json.dump({"valid_ndcg@10_history": valid_history, "valid_ndcg@10_history_recbole_protocol":
                       valid_history_recbole, "epoch_seconds": train_secs, "epoch_cpu_seconds": train_cpu}, f)
        return valid_history[-1], result

    trainer._valid_epoch = recorded
    trainer.fit(train, valid, saved=True, show_progress=False)
    res = trainer.evaluate(test, load_best_model=True, show_progress=False)  # loads the best weights
    mine = protocol_metrics(trainer.model, seqs, "test", exclude_history=True)
    check = protocol_metrics(trainer.model, seqs, "test", exclude_history=False)
    if abs(check["ndcg@10"] - float(res["ndcg@10"])) > 1e-3:
        raise SystemExit(f"protocol_metrics without history exclusion gives NDCG@10 {check['ndcg@10']:.4f}, "
                         f"RecBole's evaluator {float(res['ndcg@10']):.4f}: the two disagree")
    best = len(train_secs) - 1 - int(trainer.cur_step)
    with open(out, "w") as f:
        json.dump({**mine, "recbole_protocol": {"ndcg@10": float(res["ndcg@10"]), "hr@10": float(res["hit@10"])},
                   "best_epoch": best, "seconds_to_best": seconds_to_best(train_secs, valid_secs, best),
                   "valid_seconds": valid_secs,
                   "epochs": len(train_secs), "epoch_seconds": sum(train_secs) / max(1, len(train_secs)),
                   "epoch_cpu_seconds": sum(train_cpu) / max(1, len(train_cpu)), "train_batch_size": batch_size,
                   "valid_ndcg@10_history": valid_history,
                   "valid_ndcg@10_history_recbole_protocol": valid_history_recbole,
                   "n_users": int(dataset.user_num - 1), "n_items": int(dataset.item_num - 1)}, f)


# --------------------------------------------------------------------------- our side


_SASREC = "dropout: 0.5, num_layers: 2, num_heads: 2, inner: 256"
_PREFIXES = "train_on: prefixes, prefixes_per_user: null"
_INIT = "linear_init_std: 0.02"  # RecBole's initializer_range for every linear/attention weight
_TILED = "window_stride: 50, window_jitter: false, ema_decay: null, lr_plateau_factor: null"  # the default before window_stride
_PLAIN = "window_jitter: false, ema_decay: null, lr_plateau_factor: null"
REGIMES = {  # our training regime -> (run folder, rec overrides); see the module docstring
    "prefixes": ("ours-prefixes", [f"rec.params={{{_SASREC}, {_PREFIXES}}}", "rec.cpus_per_worker=2"]),
    # our default (slim_ray/rec/defaults/sasrec.yaml): overlapping windows that move each epoch, weight average
    "windows": ("ours", [f"rec.params={{{_SASREC}}}", "rec.cpus_per_worker=2"]),
    "windows-tiled": ("ours-tiled", [f"rec.params={{{_SASREC}, {_TILED}}}", "rec.batch_size=64",
                                     "rec.cpus_per_worker=1"]),
    # the default before window_jitter and ema_decay: the same windows every epoch, no weight average
    "windows-plain": ("ours-plain", [f"rec.params={{{_SASREC}, {_PLAIN}}}", "rec.cpus_per_worker=2"]),
    "prefixes-init": ("ours-prefixes-init", [f"rec.params={{{_SASREC}, {_PREFIXES}, {_INIT}}}",
                                             "rec.cpus_per_worker=2"]),
    "windows-init": ("ours-init", [f"rec.params={{{_SASREC}, {_INIT}}}", "rec.cpus_per_worker=2"]),
}


def ours(run_dir: str, seeds: list[int], epochs: int, patience: int, regime: list[str]) -> dict:
    from slim_ray.config import load_config
    from slim_ray.rec.stage import run_evaluate, run_train

    cfg = load_config(None, [
        f"run_dir={run_dir}", "rec.backbone=sasrec", "rec.mode=id", f"rec.seeds={seeds}", f"rec.epochs={epochs}",
        f"rec.patience={patience}", "rec.max_len=50", "rec.loss=softmax", "rec.lr=0.001", "rec.hidden=64",
        "evaluate.protocols=[full]", "ray.num_cpus=2", *regime,
    ])
    run_train(cfg)
    m = run_evaluate(cfg)
    with open(os.path.join(cfg.layout.eval, "metrics.json")) as f:
        e = json.load(f)["results"]["sasrec"]["id"]
    history, to_best = {}, {}
    for s in seeds:
        with open(os.path.join(cfg.layout.rec_run("sasrec", "id", s, None), "meta.json")) as f:
            meta = json.load(f)
        validated = [h for h in meta["history"] if "valid_ndcg@10" in h]
        history[str(s)] = [h["valid_ndcg@10"] for h in validated]
        to_best[str(s)] = sum(h["epoch_seconds"] + h.get("valid_seconds", 0.0)
                              for h in meta["history"] if h["epoch"] <= meta["best_epoch"])
    return {"per_seed": {s: e["per_seed"][s]["full"] for s in e["per_seed"]},
            "epoch_seconds": e["mean_epoch_seconds"], "best_epoch": e["best_epoch"],
            "seconds_to_best": to_best, "valid_ndcg@10_history": history}


def load_recbole(out: str) -> dict:
    """A finished RecBole result, or the learning curve of a run that was stopped (``cut``)."""
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    with open(out + ".partial") as f:
        part = json.load(f)
    return {**part, "cut": True, "epochs": len(part["valid_ndcg@10_history"])}


def print_curves(theirs_seed: dict, mine: dict[str, dict], seed: str) -> None:
    """Valid NDCG@10 after each epoch, side by side (an epoch: one pass over the same targets)."""
    cols = {"RecBole": theirs_seed["valid_ndcg@10_history"]}
    cols.update({f"ours-{r}": m["valid_ndcg@10_history"][seed] for r, m in mine.items()
                 if seed in m["valid_ndcg@10_history"]})
    w = max(len(c) for c in cols) + 2
    print(f"\nvalid NDCG@10 (full ranking, history excluded) after each epoch, seed {seed}:\n{'epoch':>6s}"
          + "".join(f"{c:>{w}s}" for c in cols))
    for ep in range(max(len(h) for h in cols.values())):
        print(f"{ep + 1:6d}" + "".join(f"{h[ep]:{w}.4f}" if ep < len(h) else " " * w for h in cols.values()))


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
                    "about 85 s on 2 cores at batch 256")
    ap.add_argument("--recbole-batch", type=int, default=RECBOLE["train_batch_size"],
                    help="RecBole's train_batch_size (its default 2048 gives 41 steps per epoch over the 82,626 "
                    "ML-100K training prefixes; a smaller one takes more steps per epoch, so fewer epochs)")
    ap.add_argument("--reuse-recbole", action="store_true",
                    help="use RecBole results already in --workdir, including the curve of a run that was "
                    "stopped (recbole-s<seed>.json.partial), instead of training RecBole again")
    ap.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=["prefixes", "windows"],
                    help="how ours trains: prefixes (RecBole's regime and batch) and/or windows (our default: a "
                    "loss at every position, batch 16; the parity check), windows-plain (the default before window_jitter, "
                    "ema_decay and lr_plateau_factor); "
                    "-init: RecBole's initialisation")
    ap.add_argument("--regime-seeds", nargs="*", default=[], metavar="REGIME=S,S",
                    help="seeds of one regime, e.g. prefixes=0 (default: --seeds)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench-parity"))
    ap.add_argument("--recbole-worker", nargs=7, metavar=("DATA", "NAME", "SEED", "EPOCHS", "PATIENCE", "OUT", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)  # the RecBole worker runs with the work dir as its cwd
    if args.recbole_worker:
        d, n, s, e, p, o, b = args.recbole_worker
        recbole_worker(d, n, int(s), int(e), int(p), o, int(b))
        return 0

    seq = args.sequences or os.path.join(ROOT, "runs", "shared-ml100k", "prepared", "sequences")
    if not os.path.exists(seq):
        raise SystemExit(f"{seq}: no prepared MovieLens-100K (run `slim-ray prepare` or pass --sequences)")
    os.makedirs(args.workdir, exist_ok=True)
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
    seeds_of = {r: args.seeds for r in args.regimes}
    for item in args.regime_seeds:
        r, _, ss = item.partition("=")
        if r not in seeds_of or not ss:
            raise SystemExit(f"--regime-seeds {item!r}: expected REGIME=S[,S...] with REGIME in {args.regimes}")
        seeds_of[r] = [int(x) for x in ss.split(",")]
    mine = {}
    for regime in args.regimes:
        folder, overrides = REGIMES[regime]
        if regime.startswith("prefixes"):
            overrides = overrides + [f"rec.batch_size={args.recbole_batch}"]
        run_dir = os.path.join(args.workdir, folder)
        prepared = os.path.join(run_dir, "prepared")
        if not os.path.exists(prepared):
            os.makedirs(run_dir, exist_ok=True)
            os.symlink(os.path.dirname(os.path.abspath(seq)), prepared)
        mine[regime] = ours(run_dir, seeds_of[regime], args.epochs, args.patience, overrides)
    cut = [s for s in recbole_seeds if theirs[str(s)].get("cut")]
    if cut:
        print_curves(theirs[str(cut[0])], mine, str(cut[0]))
        print(f"\nRecBole seed(s) {cut} were stopped before early stopping ended them: no test figure to "
              "compare; the curves above are the comparison (both on the same validation targets).")
        with open(os.path.join(args.workdir, "parity.json"), "w") as f:
            json.dump({"recbole": theirs, "ours": mine}, f, indent=1)
        return 0

    import numpy as np

    def mean_std(xs):  # sample std over seeds, as `slim-ray evaluate` reports it
        return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0

    def row(label, ndcg, hr, epoch_s, to_best, epochs, best):
        print(f"{label:34s}{100 * ndcg[0]:7.2f} ± {100 * ndcg[1]:4.2f}{100 * hr[0]:8.2f} ± {100 * hr[1]:4.2f}"
              f"{epoch_s:10.1f}{to_best:11.1f}  {epochs:<12s}{best}")

    r_ndcg = mean_std([theirs[str(s)]["ndcg@10"] for s in recbole_seeds])
    r_hr = mean_std([theirs[str(s)]["hr@10"] for s in recbole_seeds])
    r_ep = float(np.mean([theirs[str(s)]["epoch_seconds"] for s in recbole_seeds]))
    r_best = [theirs[str(s)].get("seconds_to_best") for s in recbole_seeds]
    r_best = float(np.mean(r_best)) if None not in r_best else float("nan")  # older result files lack it
    print(f"\nMovieLens-100K, leave-one-out, full ranking, SASRec (test NDCG@10 / HR@10 in %, mean ± std); "
          f"RecBole seeds {recbole_seeds}, ours {seeds_of}; s to best: training + validation seconds up to "
          "and including the best epoch")
    print(f"{'':34s}{'NDCG@10':>14s}{'HR@10':>15s}{'s/epoch':>10s}{'s to best':>11s}  {'epochs':<12s}best valid")
    row(f"RecBole 1.2.1 (batch {theirs[str(recbole_seeds[0])].get('train_batch_size')})", r_ndcg, r_hr, r_ep, r_best,
        ",".join(str(theirs[str(s)]["epochs"]) for s in recbole_seeds),
        ",".join(f"{max(theirs[str(s)]['valid_ndcg@10_history']):.3f}" for s in recbole_seeds))
    own = [theirs[str(s)]["recbole_protocol"] for s in recbole_seeds if "recbole_protocol" in theirs[str(s)]]
    if own:  # the same models, scored by RecBole's evaluator (history items ranked too)
        row("  same, RecBole's own protocol", mean_std([o["ndcg@10"] for o in own]),
            mean_std([o["hr@10"] for o in own]), r_ep, r_best, "", "")
    result = {"recbole": theirs, "ours": mine}
    for regime, m in mine.items():
        seeds = seeds_of[regime]
        o_ndcg = mean_std([m["per_seed"][str(s)]["ndcg@10"] for s in seeds])
        o_hr = mean_std([m["per_seed"][str(s)]["hr@10"] for s in seeds])
        o_ep = float(np.mean([x for x in m["epoch_seconds"] if x is not None]))
        o_best = float(np.mean([m["seconds_to_best"][str(s)] for s in seeds]))
        row(f"slim_ray, {regime}", o_ndcg, o_hr, o_ep, o_best,
            ",".join(str(len(m["valid_ndcg@10_history"][str(s)])) for s in seeds),
            ",".join(f"{max(m['valid_ndcg@10_history'][str(s)]):.3f}" for s in seeds))
        result[f"ndcg_rel_diff_{regime}"] = o_ndcg[0] / r_ndcg[0] - 1
        result[f"hr_rel_diff_{regime}"] = o_hr[0] / r_hr[0] - 1
        result[f"epoch_time_ratio_{regime}"] = o_ep / r_ep
        result[f"time_to_best_ratio_{regime}"] = o_best / r_best
    print(f"RecBole CPU-seconds per epoch (wall and CPU time grow when other jobs share the cores): "
          f"{np.mean([theirs[str(s)].get('epoch_cpu_seconds', float('nan')) for s in recbole_seeds]):.1f}")
    print_curves(theirs[str(recbole_seeds[0])], mine, str(recbole_seeds[0]))
    print()
    for regime in mine:
        print(f"ours-{regime} / RecBole - 1: NDCG@10 {100 * result[f'ndcg_rel_diff_{regime}']:+.1f}%, HR@10 "
              f"{100 * result[f'hr_rel_diff_{regime}']:+.1f}%, epoch time x{result[f'epoch_time_ratio_{regime}']:.2f}, "
              f"time to best epoch x{result[f'time_to_best_ratio_{regime}']:.3f}")
    if "windows" in mine:  # our default: at least RecBole's test NDCG@10 in a tenth of its time to best
        ok = result["ndcg_rel_diff_windows"] >= 0 and result["time_to_best_ratio_windows"] <= 0.1
        result["parity_above_recbole"] = bool(ok)
        print("parity above RecBole (ours-windows test NDCG@10 >= RecBole's, time to best <= 1/10 of RecBole's): "
              f"{'yes' if ok else 'NO'}")
    with open(os.path.join(args.workdir, "parity.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
