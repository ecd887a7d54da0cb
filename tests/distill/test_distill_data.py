"""The distillation pairs: masking, truncation, held-out split, skips, data position, configs."""

from __future__ import annotations

import pyarrow as pa
import pytest
from distill_fixtures import make_items, make_rationales, make_sequences

from slim_ray.distill.config import DistillConfig
from slim_ray.distill.dataset import (
    IGNORE_INDEX,
    build_dataset,
    collate,
    names_seen_item,
    split_users,
    step_indices,
)
from slim_ray.distill.strategy import deepspeed_config


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from slim_ray.assets import resolve_llm

    return AutoTokenizer.from_pretrained(resolve_llm("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tables():
    items, seqs = make_items(), make_sequences()
    return items, seqs, make_rationales(items, seqs)


def _build(tables, tok, **kw):
    items, seqs, rats = tables
    args = dict(max_length=256, eval_fraction=0.2, min_eval_users=2, seed=0)
    args.update(kw)
    return build_dataset(rats, seqs, items, tok, **args)


def test_loss_only_on_rationale_tokens(tables, tok):
    data = _build(tables, tok)
    ex = data.train[0]
    prompt = tok.decode(ex.input_ids[: ex.n_prompt])
    target = tok.decode(ex.input_ids[ex.n_prompt:])
    assert prompt.endswith("<|im_start|>assistant\n")  # the student's chat template
    assert "most recent first" in prompt and "Step 1" not in prompt.split("<|im_start|>user")[0]
    assert target.startswith("Step 1: The user enjoys") and target.endswith(tok.eos_token)
    batch = collate(data.train[:3], tok.pad_token_id)
    for i, e in enumerate(data.train[:3]):
        labels = batch["labels"][i]
        assert (labels[: e.n_prompt] == IGNORE_INDEX).all()
        assert labels[e.n_prompt: len(e.input_ids)].tolist() == e.input_ids[e.n_prompt:]
        assert (labels[len(e.input_ids):] == IGNORE_INDEX).all()
        assert int(batch["attention_mask"][i].sum()) == len(e.input_ids)


def test_error_rows_skipped_split_is_seeded_and_disjoint(tables, tok):
    a, b = _build(tables, tok), _build(tables, tok)
    assert a.stats["skipped_error"] == 1 and a.stats["rows"] == 16
    assert a.stats["train"] + a.stats["eval"] == 15 and a.stats["eval"] == 3
    train_u, eval_u = {e.user_id for e in a.train}, {e.user_id for e in a.eval}
    assert not train_u & eval_u and 3 not in train_u | eval_u
    assert eval_u == {e.user_id for e in b.eval} and a.data_hash == b.data_hash
    c = _build(tables, tok, seed=1)
    assert c.data_hash != a.data_hash
    assert split_users(range(100), 0.1, 2, 5) == split_users(range(100), 0.1, 2, 5)
    assert len(split_users(range(3), 0.9, 2, 0)) == 2  # never every user


def test_truncation_is_counted(tables, tok):
    full = _build(tables, tok)
    n_prompt = max(e.n_prompt for e in full.train + full.eval)
    cut = _build(tables, tok, max_length=n_prompt + 10)
    assert cut.stats["truncated"] == 15 and cut.stats["skipped_too_long"] == 0
    assert all(len(e.input_ids) <= n_prompt + 10 for e in cut.train)
    with pytest.raises(ValueError, match="no usable teacher rationales.*'skipped_too_long': 15"):
        _build(tables, tok, max_length=n_prompt - 40)  # prompts alone exceed it


def test_filters_and_bad_rows(tables, tok):
    items, seqs, rats = tables
    # step 3 of even users names a title they have seen
    kept = _build(tables, tok, drop_seen_items=True)
    assert kept.stats["skipped_seen_items"] == 8
    assert all(e.user_id % 2 for e in kept.train + kept.eval)
    hist = [{"title": "Toy Story"}]
    assert names_seen_item("Step 3: watch Toy Story again", hist)
    assert not names_seen_item("Step 3: watch Heat", hist)
    rows = rats.to_pylist()
    rows[0]["step2"] = None
    t = pa.Table.from_pylist(rows, schema=rats.schema)
    d = build_dataset(t, seqs, items, tok, max_length=256, eval_fraction=0.2, min_eval_users=2,
                      seed=0, drop_missing_steps=True)
    assert d.stats["skipped_missing_steps"] == 1
    rows[0]["prefix_len"] = 99
    bad = pa.Table.from_pylist(rows, schema=rats.schema)
    with pytest.raises(ValueError, match=r"teacher\.parquet: row 0 \(user_id=1\): prefix_len=99"):
        build_dataset(bad, seqs, items, tok, max_length=256, eval_fraction=0.2, min_eval_users=2,
                      seed=0, source="teacher.parquet")


def test_step_indices_are_the_data_position():
    n, g = 10, 4
    steps = [step_indices(n, s, g, seed=7) for s in range(5)]  # 20 samples = 2 epochs
    assert steps == [step_indices(n, s, g, seed=7) for s in range(5)]  # pure function of the step
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation per epoch
    assert step_indices(n, 0, g, seed=8) != steps[0]


def test_config_and_deepspeed_config():
    with pytest.raises(ValueError, match="offload_params needs zero_stage: 3"):
        DistillConfig(offload_params=True, zero_stage=2)
    with pytest.raises(ValueError, match="extra"):
        DistillConfig(lora_rank=8)
    ds = deepspeed_config(zero_stage=3, batch_size=2, grad_accum=4, world_size=2, grad_clip=1.0,
                          offload_optimizer=True)
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # ZeRO-3 steps Adam one 5e7-element sub-group at a time: its temporaries stay small
    assert ds["zero_optimization"]["sub_group_size"] == 50_000_000
    assert "sub_group_size" not in deepspeed_config(zero_stage=2, batch_size=2, grad_accum=1, world_size=2,
                                                    grad_clip=1.0)["zero_optimization"]
    assert ds["bf16"] == {"enabled": False} and ds["zero_allow_untested_optimizer"]
