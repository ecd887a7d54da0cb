"""The two training strategies behind one interface: the loop cannot tell them apart.

The interface check compares the public names and signatures of both classes; the DDP check
runs real torch steps, collectives and a checkpoint round trip in one process (DeepSpeed runs
for real in test_distill_fault.py).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from slim_ray.distill.config import DistillConfig
from slim_ray.distill.strategy import DDPStrategy, DeepSpeedStrategy, Strategy, make_strategy


def _public(cls) -> dict[str, str]:
    """name -> signature (or kind) of every public member, as the training loop sees it."""
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        out[name] = str(inspect.signature(member)) if callable(member) else type(member).__name__
    return out


def test_strategies_share_one_interface():
    assert inspect.isabstract(Strategy)
    for cls in (DeepSpeedStrategy, DDPStrategy):
        assert issubclass(cls, Strategy) and not inspect.isabstract(cls), cls
    ds, ddp = _public(DeepSpeedStrategy), _public(DDPStrategy)
    assert ds == ddp
    for name in ("setup", "loss", "backward", "step", "save", "load", "all_reduce",
                 "all_gather_object", "barrier", "lr", "train", "module"):
        assert name in ds, name
    assert ds["all_reduce"] == "(self, values: 'list[float]', op: 'str' = 'sum') -> 'list[float]'"
    assert "all_reduce_sum" not in ds


def test_make_strategy_follows_the_config():
    s = make_strategy(DistillConfig(zero_stage=3, offload_optimizer=True, batch_size=3, grad_accum=2),
                      bf16=False, use_gpu=False)
    assert type(s) is DeepSpeedStrategy and s.kind == "deepspeed"
    assert (s.zero_stage, s.offload_optimizer, s.batch_size, s.grad_accum) == (3, True, 3, 2)
    s = make_strategy(DistillConfig(strategy="ddp", grad_clip=0.5), bf16=False, use_gpu=False)
    assert type(s) is DDPStrategy and s.kind == "ddp" and s.grad_clip == 0.5
    assert not hasattr(s, "zero_stage")


class _Tiny(torch.nn.Module):
    """An HF-shaped model: ``model(**batch).loss``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.lin(x) - y) ** 2).mean())


def test_ddp_steps_collectives_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = make_strategy(DistillConfig(strategy="ddp", grad_accum=2, grad_clip=0.0), bf16=False, use_gpu=False)
    s.setup(model, opt, None)
    assert (s.rank, s.world_size, s.distributed) == (0, 1, False)
    batch = {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)}
    w0 = model.lin.weight.detach().clone()
    s.backward(s.loss(batch))
    assert s.step() is False and torch.equal(model.lin.weight, w0)  # mid-accumulation: no update
    s.backward(s.loss(batch))
    assert s.step() is True and not torch.equal(model.lin.weight, w0)

    # one process: the reductions are the identity, in float64
    assert s.all_reduce([1.5, 2.0], "sum") == [1.5, 2.0]
    assert s.all_reduce([3.0], "max") == [3.0] and s.all_reduce([3.0], "min") == [3.0]
    with pytest.raises(ValueError, match="unknown op 'mean'"):
        s.all_reduce([1.0], "mean")
    assert s.all_gather_object("node") == ["node"]

    saved = model.lin.weight.detach().clone()
    s.save(str(tmp_path), {"step": 1}, trainable_only=True)
    torch.manual_seed(1)
    fresh = _Tiny()
    s2 = make_strategy(DistillConfig(strategy="ddp", grad_accum=2), bf16=False, use_gpu=False)
    s2.setup(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), None)
    assert not torch.equal(fresh.lin.weight, saved)
    assert s2.load(str(tmp_path)) == {"step": 1}
    assert torch.equal(fresh.lin.weight, saved) and s2._micro == 2



# Runs in a fresh Python: a one-process gloo group and DeepSpeed's global state die with it.
ZERO3_FULL_LOAD = r"""
import json, os, sys
import deepspeed, torch
import torch.distributed as dist
from slim_ray.assets import resolve_llm
from slim_ray.distill.config import DistillConfig
from slim_ray.distill.strategy import make_strategy
from slim_ray.distill.train import build_model

# what Ray Train sets in each worker
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
from transformers import AutoTokenizer
path = resolve_llm(sys.argv[1])
ids = AutoTokenizer.from_pretrained(path)("Step 1: The user enjoys Comedy movies such as Toy Story and "
                                          "Groundhog Day. Step 2: Recommend more comedies.", return_tensors="pt").input_ids
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
d = DistillConfig(method="full", zero_stage=3, batch_size=1)
whole, _ = build_model(path, d)  # loaded the usual way, for the reference loss
with torch.no_grad():
    reference = float(whole(**batch).loss)
del whole
s = make_strategy(d, bf16=False, use_gpu=False)
with s.loading(partitioned=True):
    model, n_trainable = build_model(path, d)
params = list(model.parameters())
out = {"n_trainable": n_trainable, "partitioned": sum(hasattr(p, "ds_id") for p in params),
       "params": len(params), "placeholder_numel": sum(p.numel() for p in params), "reference": reference}
s.setup(model, torch.optim.AdamW(params, lr=1e-5), None)
losses = []
for _ in range(2):
    loss = s.loss(batch)
    s.backward(loss)
    s.step()
    losses.append(float(loss))
out["losses"] = losses
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
"""


def test_zero3_full_fine_tune_loads_partitioned():
    """Under ZeRO-3 a full fine-tune's model loads straight into partitions (zero.Init): no
    parameter is materialised whole, the trainable count and the loss are the usual model's, and
    it trains."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoConfig

    from slim_ray.assets import resolve_llm
    from slim_ray.scale.standin import free_port

    proc = subprocess.run([sys.executable, "-c", ZERO3_FULL_LOAD, "smollm2-135m-instruct", str(free_port())],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    cfg = AutoConfig.from_pretrained(resolve_llm("smollm2-135m-instruct"))
    assert out["partitioned"] == out["params"] > 0
    assert out["placeholder_numel"] == 0  # every parameter is an empty placeholder outside its partition
    # SmolLM2-135M: 134,515,008 parameters (tied embeddings), from its own config
    h, n_layers, inter, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    assert out["n_trainable"] == vocab * h + n_layers * per_layer + h == 134_515_008
    # the partitioned model is the same model: its first loss is the one loaded the usual way
    assert out["losses"][0] == pytest.approx(out["reference"], rel=1e-4) and out["reference"] < 8
    assert out["losses"][1] < out["losses"][0]  # the same batch twice: the step lowered its loss
