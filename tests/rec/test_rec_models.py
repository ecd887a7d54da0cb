"""Leave-one-out arrays, configs, and every backbone x mode: one epoch learns, shapes hold."""

import math

import numpy as np
import pytest
import torch

from rec_testdata import synthetic_run
from slim_ray.config import ConfigError, load_config
from slim_ray.rec import data as rd
from slim_ray.rec.config import backbone_defaults, parse_variant, resolve_hparams, validate_hparams
from slim_ray.rec.fusion import SeqRec
from slim_ray.rec.models import build_backbone
from slim_ray.rec.models.srgnn import session_graph
from slim_ray.rec.train import run_spec

BACKBONES = ["sasrec", "gru4rec", "srgnn"]
MODES = ["id", "id_text", "slim", "text"]


def test_leave_one_out_split_and_examples():
    data = rd.RecData(np.array([1, 2]), [np.array([5, 6, 7, 8, 9]), np.array([3, 4, 5])], 9, 2)
    v = rd.eval_split(data, "valid", 3)
    assert v.targets.tolist() == [8, 4]
    assert v.seq.tolist() == [[5, 6, 7], [3, 0, 0]] and v.lens.tolist() == [3, 1]
    t = rd.eval_split(data, "test", 3)
    assert t.targets.tolist() == [9, 5]
    assert t.seq.tolist() == [[6, 7, 8], [3, 4, 0]]  # the most recent max_len items
    assert sorted(zip(t.excl_rows.tolist(), t.excl_cols.tolist())) == [(0, 5), (0, 6), (0, 7), (0, 8), (1, 3), (1, 4)]
    w = rd.window_examples(data, 2)  # train prefix of user 1: 5 6 7 -> inputs 5 6, targets 6 7
    assert w.seq.tolist() == [[5, 6]] and w.targets.tolist() == [[6, 7]]  # user 2 has a 1-item prefix
    p = rd.prefix_examples(data, 2, None, np.random.default_rng(0))
    assert p.seq.tolist() == [[5, 0], [5, 6]] and p.targets.tolist() == [[6, 0], [0, 7]]


def test_overlapping_windows_predict_every_target_once_with_context():
    """window_stride: each training target once, from at least max_len - stride earlier items when
    the history has them; without it the windows tile the history and a window's first positions
    start from nothing."""
    rng = np.random.default_rng(0)
    lengths = [3, 9, 12, 50, 51, 137]
    data = rd.RecData(np.arange(1, len(lengths) + 1),
                      [rng.integers(1, 500, size=n) for n in lengths], 500, len(lengths))
    L = 10
    cases = [(stride, None) for stride in (None, 25, 10, 5, 3, 1)]
    # window_jitter: per-user shifts of the window ends (a new draw every epoch) keep both promises
    cases += [(stride, np.random.default_rng(k)) for stride in (5, 3, 7) for k in range(3)]
    for stride, jitter in cases:
        ex = rd.window_examples(data, L, stride=stride, jitter=jitter)
        for u, seq in zip(data.user_ids, data.seqs):
            rows = np.flatnonzero(ex.users == u)
            n_targets = len(seq) - 3  # training prefix len - 2 items, each after the first one is a target
            got = sorted(int(t) for r in rows for t in ex.target_pos[r][ex.targets[r] > 0])
            assert got == list(range(1, n_targets + 1)), (stride, u)  # every target index exactly once
            for r in rows:
                for i in np.flatnonzero(ex.targets[r] > 0):
                    t = ex.target_pos[r][i]
                    assert ex.targets[r][i] == seq[t] and ex.seq[r][i] == seq[t - 1]
                    context = i + 1  # items the position reads, itself included
                    if stride is not None:
                        assert context >= min(t, L - min(stride, L) + 1), (stride, u, t, context)
        no_overlap = rd.window_examples(data, L)
        if stride in (None, 25, L):  # a stride of max_len or more: no overlap
            assert np.array_equal(ex.seq, no_overlap.seq) and np.array_equal(ex.targets, no_overlap.targets)
    # without overlap, the 137-item user's windows start from nothing at most window starts
    ex = rd.window_examples(data, L)
    long_user = ex.users == len(lengths)
    assert (ex.targets[long_user][:, 0] > 0).all() and long_user.sum() == math.ceil(134 / L)
    with pytest.raises(ValueError, match="window stride 0 must be at least 1"):
        rd.window_examples(data, L, stride=0)


def test_mask_dropout_keeps_nn_dropout_distribution_and_is_identity_in_eval():
    from slim_ray.rec.models.sasrec import MaskDropout, SASRec

    torch.manual_seed(0)
    x = torch.ones(200_000)
    for p, drop_share in ((0.5, 0.5), (0.3, 77 / 256)):  # p rounded to a multiple of 1/256
        drop = MaskDropout(p).train()
        y = drop(x)
        kept = y > 0
        assert abs(kept.float().mean().item() - (1 - drop_share)) < 0.005, p
        assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - drop_share)))  # expectation kept
        assert abs(y.mean().item() - 1.0) < 0.01
        assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(3)
    first = MaskDropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(MaskDropout(0.5).train()(x), first)  # torch's seed makes the mask reproducible
    assert not torch.equal(MaskDropout(0.5).train()(x), first)
    sasrec = SASRec(validate_hparams("sasrec", resolve_hparams(load_config(None, []).rec, "sasrec")))
    # every dropout, attention weights included, is a byte mask
    assert not [m for m in sasrec.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(isinstance(b.self_attn.weight_drop, MaskDropout) for b in sasrec.blocks.layers)


def test_causal_self_attention_matches_torch_multihead_attention_without_dropout():
    from slim_ray.rec.models.sasrec import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 2, 0.0).train()
    x = torch.randn(4, 7, 64, requires_grad=True)
    causal = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
    ours = attn(x, x, x, attn_mask=causal, need_weights=False)[0]
    theirs = torch.nn.MultiheadAttention.forward(attn, x, x, x, attn_mask=causal, need_weights=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), attn.in_proj_weight)[0]
    g_theirs = torch.autograd.grad(theirs.square().sum(), attn.in_proj_weight)[0]
    assert torch.allclose(g_ours, g_theirs, atol=1e-4)
    as_bool = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)  # True: masked; torch's own path
    assert torch.allclose(attn(x, x, x, attn_mask=as_bool, need_weights=False)[0], theirs, atol=1e-5)
    # with dropout, training drops whole attention weights (the output changes) and eval does not
    attn = CausalSelfAttention(64, 2, 0.5)
    attn.eval()
    plain = attn(x, x, x, attn_mask=causal, need_weights=False)[0]
    attn.train()
    dropped = attn(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert not torch.allclose(plain, dropped, atol=1e-3)
    assert sorted(dict(attn.named_parameters())) == ["in_proj_bias", "in_proj_weight", "out_proj.bias",
                                                     "out_proj.weight"]  # nn.MultiheadAttention's keys


def test_plateau_learning_rate_decays_after_patience_validations_without_a_better_one():
    from slim_ray.rec.train import plateau_lr

    hp = resolve_hparams(load_config(None, ["rec.params={lr_plateau_factor: 0.5, lr_plateau_patience: 2}"]).rec,
                         "sasrec")
    lr, seen = 1e-3, []
    # validations: better, worse, worse (decay), worse, worse (decay), better, worse
    bad = 0
    for improved in (True, False, False, False, False, True, False):
        bad = 0 if improved else bad + 1
        lr = plateau_lr(hp, lr, improved, bad)
        seen.append(lr)
    assert seen == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 2.5e-4]
    sasrec = resolve_hparams(load_config(None, []).rec, "sasrec")  # SASRec's default: halve after 2
    assert [plateau_lr(sasrec, 1e-3, False, bad) for bad in (1, 2, 3, 4)] == [1e-3, 5e-4, 1e-3, 5e-4]
    for backbone in ("gru4rec", "srgnn"):  # off for the others
        assert plateau_lr(resolve_hparams(load_config(None, []).rec, backbone), 1e-3, False, 4) == 1e-3
    off = resolve_hparams(load_config(None, ["rec.params={lr_plateau_factor: null}"]).rec, "sasrec")
    assert plateau_lr(off, 1e-3, False, 4) == 1e-3
    with pytest.raises(ConfigError, match="lr_plateau_factor"):
        load_config(None, ["rec.params={lr_plateau_factor: 1.5}"])


def test_weight_average_follows_the_steps_with_a_warmed_up_decay_and_is_on_for_sasrec_only():
    from slim_ray.rec.train import weight_average

    sasrec = resolve_hparams(load_config(None, []).rec, "sasrec")
    assert sasrec["ema_decay"] == 0.99 and sasrec["window_jitter"] is True  # the parity regime (README)
    assert weight_average(torch.nn.Linear(2, 2), sasrec).decay == 0.99
    for backbone in ("gru4rec", "srgnn"):
        assert weight_average(torch.nn.Linear(2, 2), resolve_hparams(load_config(None, []).rec, backbone)) is None
    plain = resolve_hparams(load_config(None, ["rec.params={ema_decay: null, window_jitter: false}"]).rec, "sasrec")
    assert weight_average(torch.nn.Linear(2, 2), plain) is None and plain["window_jitter"] is False
    hp = resolve_hparams(load_config(None, ["rec.params.ema_decay=0.9"]).rec, "sasrec")
    net = torch.nn.Linear(3, 1)
    ema = weight_average(net, hp)
    expected = net.weight.detach().clone()
    for n in range(120):  # stand-in optimizer steps
        with torch.no_grad():
            net.weight.add_(1.0)
        decay = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.18, ..., 0.9 from n = 80 on
        expected = decay * expected + (1 - decay) * net.weight.detach()
        ema.update()
    weights = net.weight.detach().clone()
    ema.swap()
    assert torch.allclose(net.weight, expected) and not torch.allclose(net.weight, weights)  # the average lags
    ema.swap()
    assert torch.equal(net.weight, weights)  # swapped back
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["rec.params.ema_decay=1.0"])


def test_variant_spelling_and_hparam_merge_order():
    assert parse_variant("slim") == ("slim", "student")
    assert parse_variant("slim:teacher") == ("slim", "teacher")
    assert parse_variant("id") == ("id", None)
    with pytest.raises(ValueError, match="drop ':teacher'"):
        parse_variant("id:teacher")
    cfg = load_config(None, ["rec.backbone=[sasrec,srgnn]", "rec.mode=[id,slim:teacher]", "rec.seeds=[1,2]",
                             "rec.lr=0.01", "rec.params={dropout: 0.5}"])
    assert cfg.rec.variants == [("id", None), ("slim", "teacher")] and cfg.rec.seed_list == [1, 2]
    hp = resolve_hparams(cfg.rec, "sasrec")
    assert hp["lr"] == 0.01 and hp["dropout"] == 0.5 and hp["num_heads"] == 2
    spec = run_spec(cfg, "srgnn", "slim", "teacher", 1)
    assert spec["user_embeddings"].endswith("embeddings/teacher")
    assert spec["hp"] == resolve_hparams(cfg.rec, "srgnn") and spec["hp"]["lr"] == 0.01
    with pytest.raises(ConfigError, match="unknown backbone"):
        load_config(None, ["rec.backbone=bert4rec"])
    # optional keys without a YAML default: absent by default (existing runs keep their fingerprint)
    assert "prefixes_per_user" not in hp and "linear_init_std" not in hp
    hp = resolve_hparams(load_config(None, ["rec.params={train_on: prefixes, prefixes_per_user: null}"]).rec, "sasrec")
    assert hp["train_on"] == "prefixes" and hp["prefixes_per_user"] is None


def test_protocol_sweep_and_step_ablation_spelling_name_distinct_runs():
    """rec.rationale_protocol as a list trains each rationale variant once per protocol (leaky runs
    get their own folder and variant name, so one evaluation compares both); id runs once; a
    per-step variant reads its own embeddings but its cut from the whole role's rationales."""
    assert parse_variant("slim:teacher-step3") == ("slim", "teacher-step3")
    with pytest.raises(ValueError, match="-step1"):
        parse_variant("slim:teacher-step4")
    cfg = load_config(None, ["rec.backbone=sasrec", "rec.mode=[id,slim:student-step1]", "rec.seeds=[0,1]",
                             "rec.rationale_protocol=[consistent,leaky]"])
    runs = cfg.rec.runs()
    assert runs == [("sasrec", "id", None, 0, None), ("sasrec", "id", None, 1, None),
                    ("sasrec", "slim", "student-step1", 0, "consistent"),
                    ("sasrec", "slim", "student-step1", 1, "consistent"),
                    ("sasrec", "slim", "student-step1", 0, "leaky"), ("sasrec", "slim", "student-step1", 1, "leaky")]
    dirs = {cfg.layout.rec_run(b, m, s, r, p) for b, m, r, s, p in runs}
    assert len(dirs) == 6 and any(d.endswith("rec/sasrec-slim-student-step1-leaky-s1") for d in dirs)
    assert cfg.layout.rec_run("sasrec", "slim", 0, "student-step1", "consistent").endswith(
        "rec/sasrec-slim-student-step1-s0")  # the default protocol keeps the plain name
    lo = run_spec(cfg, "sasrec", "slim", "student-step1", 0, "leaky")
    co = run_spec(cfg, "sasrec", "slim", "student-step1", 0, "consistent")
    assert (lo["variant"], co["variant"]) == ("slim:student-step1@leaky", "slim:student-step1")
    assert co["user_embeddings"].endswith("embeddings/student-step1") and co["rationales"].endswith("rationales/student")
    assert lo["rationales"] is None and lo["fingerprint"] != co["fingerprint"]
    assert run_spec(cfg, "sasrec", "slim", "student-step1", 0) == co  # protocol None: the first listed
    assert run_spec(cfg, "sasrec", "id", None, 0, "leaky")["variant"] == "id"


def test_backbone_params_refuse_a_misspelt_key_and_a_wrong_type_naming_the_key():
    """Each backbone's merged hyper-parameters go through its pydantic model when the config loads."""
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_headz'\] for backbone sasrec"):
        load_config(None, ["rec.params={num_headz: 3}"])
    with pytest.raises(ConfigError, match=r"rec.params.dropout='high' for backbone sasrec: .*valid number"):
        load_config(None, ["rec.params={dropout: high}"])
    with pytest.raises(ConfigError, match=r"rec.params.num_layers=2.5 for backbone gru4rec: .*valid integer"):
        load_config(None, ["rec.backbone=gru4rec", "rec.params={num_layers: 2.5}"])
    with pytest.raises(ConfigError, match=r"rec.params.step=True for backbone srgnn: .*valid integer"):
        load_config(None, ["rec.backbone=srgnn", "rec.params={step: true}"])
    with pytest.raises(ConfigError,
                       match=r"rec.params.train_on='prefix' for backbone sasrec: .*'all_positions' or 'prefixes'"):
        load_config(None, ["rec.params={train_on: prefix}"])
    with pytest.raises(ConfigError, match=r"hidden=64 is not divisible by num_heads=3"):
        load_config(None, ["rec.params={num_heads: 3}"])
    # a key of one swept backbone is unknown to another: named with the backbone that refuses it
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['inner'\] for backbone gru4rec"):
        load_config(None, ["rec.backbone=[sasrec,gru4rec]", "rec.params={inner: 32}"])
    # a valid override passes and is returned as given (run fingerprints hash these values)
    hp = resolve_hparams(load_config(None, ["rec.params={lr: 1e-3, dropout: 0}"]).rec, "sasrec")
    assert hp == {**backbone_defaults("sasrec"), "lr": "1e-3", "dropout": 0}
    # the packaged defaults are valid for their own backbone, and only for it
    for b in BACKBONES:
        assert validate_hparams(b, backbone_defaults(b)).hidden == 64
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gru_hidden'\] for backbone sasrec"):
        validate_hparams("sasrec", backbone_defaults("gru4rec"))
    # a run spec or checkpoint hp is checked again when the backbone is built
    with pytest.raises(ValueError, match=r"rec.params.inner='wide' for backbone sasrec"):
        build_backbone("sasrec", {**backbone_defaults("sasrec"), "inner": "wide"})
    assert build_backbone("gru4rec", backbone_defaults("gru4rec")).gru.hidden_size == 128


def test_linear_init_std_replaces_pytorch_defaults():
    def weights(over):
        hp = resolve_hparams(load_config(None, over).rec, "sasrec")
        return dict(SeqRec("sasrec", "id", hp, 100).named_parameters())

    default, recbole = weights([]), weights(["rec.params={linear_init_std: 0.02}"])
    attn = "backbone.blocks.layers.0.self_attn.in_proj_weight"
    assert float(default[attn].std()) > 0.06  # PyTorch's xavier-uniform for d=64
    for name, p in recbole.items():
        if name.endswith("bias") and "norm" not in name:
            assert float(p.abs().max()) == 0.0, name
        elif p.dim() == 2:  # every weight matrix, embeddings included: N(0, 0.02)
            assert abs(float(p.std()) - 0.02) < 0.002, (name, float(p.std()))


def test_session_graph_by_hand():
    seq = torch.tensor([[4, 5, 4, 6, 0]])  # 4 -> 5 -> 4 -> 6: nodes at positions 0 (4), 1 (5), 3 (6)
    alias, a_in, a_out = session_graph(seq, torch.tensor([4]))
    assert alias.tolist() == [[0, 1, 0, 3, 0]]
    assert a_out[0, 0].tolist() == [0, 0.5, 0, 0.5, 0]  # node 4 goes to 5 and to 6
    assert a_out[0, 1].tolist() == [1, 0, 0, 0, 0]
    assert a_in[0, 0].tolist() == [0, 1, 0, 0, 0]  # node 4 is entered from 5 only


def _model(backbone, mode, root, missing="learned", protocol="consistent", **over):
    cfg = load_config(None, [f"run_dir={root}", f"rec.backbone={backbone}", f"rec.mode={mode}",
                             f"rec.missing_rationale={missing}", f"rec.rationale_protocol={protocol}",
                             "rec.max_len=12", "rec.hidden=16",
                             "rec.lr=0.01"] + [f"rec.params.{k}={v}" for k, v in over.items()])
    from slim_ray.rec.train import build_model, load_data

    m, r = cfg.rec.variants[0]
    spec = run_spec(cfg, backbone, m, r, 0)
    data = load_data(spec)
    model, fallback = build_model(spec, data)
    return model, data, spec, fallback


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    synthetic_run(root, n_users=40, n_items=25, text_dim=8, rationale_users=30)
    return root


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", MODES)
def test_one_epoch_smoke_every_backbone_and_mode(tiny_run, backbone, mode):
    torch.manual_seed(0)
    model, data, spec, fallback = _model(backbone, mode, tiny_run)
    assert len(fallback) == (10 if mode in ("slim", "text") else 0)  # 30 of 40 users have rationales
    hp = spec["hp"]
    ex = (rd.window_examples(data, hp["max_len"]) if hp["train_on"] == "all_positions"
          else rd.prefix_examples(data, hp["max_len"], None, np.random.default_rng(0)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    args = [torch.as_tensor(a) for a in (ex.seq, ex.lens, ex.users, ex.targets)]
    n = int((ex.targets > 0).sum())
    losses = []
    for _ in range(8):  # full-batch steps
        loss = model(*args, norm=n)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.05, losses
    split = rd.eval_split(data, "test", hp["max_len"])
    with torch.no_grad():
        table = model.item_table()
        uv = model.last_user_vectors(torch.as_tensor(split.seq), torch.as_tensor(split.lens),
                                     torch.as_tensor(split.users), table)
    assert table.shape == (26, 16) and uv.shape == (40, 16)
    assert (model.item_id is None) == (mode == "text")  # ID-agnostic mode has no ID table


def test_bce_loss_matches_a_hand_computation(tiny_run):
    model, *_ = _model("sasrec", "text", tiny_run, loss="bce")
    model.eval()  # no dropout: the forward pass is deterministic
    seq, lens, users = torch.tensor([[1, 2, 3, 0]]), torch.tensor([3]), torch.tensor([1])
    targets = torch.tensor([[2, 3, 4, 0]])
    negs = torch.tensor([[[7, 9], [11, 5], [20, 1], [1, 1]]])
    with torch.no_grad():
        loss = float(model(seq, lens, users, targets, negs, norm=3))
        table = model.item_table().double()
        h = model.user_vectors(seq, lens, users, model.item_table()).double()[0]
    expected = 0.0
    for p in range(3):  # positions with a target; log(1 + e^x) is softplus
        expected += math.log1p(math.exp(-float(h[p] @ table[targets[0, p]])))
        for n in negs[0, p].tolist():
            expected += math.log1p(math.exp(float(h[p] @ table[n])))
    assert loss == pytest.approx(expected / 3, rel=1e-4)


def test_text_mode_scores_unseen_items_and_users_from_their_text(tiny_run):
    """ID-agnostic: a new item with item 5's text scores exactly as item 5, with other text it does
    not; a new user with user 1's rationale and history gets user 1's vector."""
    model, *_ = _model("sasrec", "text", tiny_run)
    model.eval()
    seq, lens = torch.tensor([[1, 2, 3, 0]]), torch.tensor([3])
    with torch.no_grad():
        table = model.item_table()
        uv = model.last_user_vectors(seq, lens, torch.tensor([1]), table)
        same_as_5 = model.g_l(model.item_text[5])
        other = model.g_l(torch.randn(8))
        assert float(uv[0] @ same_as_5) == pytest.approx(float(uv[0] @ table[5]), rel=1e-5)
        assert abs(float(uv[0] @ other) - float(uv[0] @ table[5])) > 1e-3
        model.user_text = torch.cat([model.user_text, model.user_text[1:2]])
        model.user_has_text = torch.cat([model.user_has_text, torch.tensor([True])])
        new_user = model.last_user_vectors(seq, lens, torch.tensor([41]), table)
        # ... or with the rationale vector passed in directly (serving)
        passed = model.last_user_vectors(seq, lens, None, table, rationale=model.user_text[1:2])
        changed = model.last_user_vectors(seq, lens, None, table, rationale=torch.randn(1, 8))
    assert torch.allclose(new_user, uv, atol=1e-6) and torch.allclose(passed, uv, atol=1e-6)
    assert (changed - uv).abs().max() > 1e-3


def test_missing_rationales_error_names_count_and_ids(tiny_run):
    with pytest.raises(rd.MissingRationales, match=r"10 of 40 users have no rationale vector, first user_ids \[31, 32, 33, 34, 35\]"):
        _model("gru4rec", "slim:teacher", tiny_run, missing="error")
    model, *_ , fallback = _model("gru4rec", "slim:teacher", tiny_run, missing="zeros", protocol="leaky")
    assert fallback[:2] == [31, 32] and model.no_rationale is None
    # the consistent protocol always learns the vector fused before a rationale's cut
    model, *_ = _model("gru4rec", "slim:teacher", tiny_run, missing="zeros")
    assert model.no_rationale is not None and model.no_rationale.shape == (8,)


def test_user_table_leaves_the_module_and_batches_carry_it_with_equal_results(tiny_run):
    """What DDP would broadcast (the module's buffers) holds no per-user table once it is popped,
    and passing each batch's rationale rows gives the loss the table gave."""
    model, data, spec, _ = _model("sasrec", "slim:teacher", tiny_run, missing="learned")
    model.eval()
    seq, lens, users = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), torch.tensor([3, 2]), torch.tensor([2, 35])
    targets = torch.tensor([[2, 3, 4, 0], [5, 6, 0, 0]])
    with torch.no_grad():
        from_table = float(model(seq, lens, users, targets, norm=5))
    text, has = model.pop_user_table()
    assert "user_text" not in dict(model.named_buffers()) and "user_has_text" not in dict(model.named_buffers())
    assert not has[35] and has[2]  # user 35 falls back to the learned vector in both paths
    with torch.no_grad():
        from_batch = float(model(seq, lens, users, targets, norm=5, rationale=text[users], has_rationale=has[users]))
        other = float(model(seq, lens, users, targets, norm=5, rationale=text[users] + 1, has_rationale=has[users]))
    assert from_batch == pytest.approx(from_table, rel=1e-6) and abs(other - from_table) > 1e-4
