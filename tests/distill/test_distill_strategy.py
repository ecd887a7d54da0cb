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
