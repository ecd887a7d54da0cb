"""Step 3 grounding: names -> catalog ids, the history flag, Step 3's HR/NDCG, the writer's
columns and summary counts, and constrained Step 3 decoding with the packaged SmolLM2-135M."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest

from gen_data import items_table, write_prepared
from slim_ray.config import load_config
from slim_ray.generate.grounding import (
    CatalogIndex, Step3Constraint, catalog_index, evaluate_folder, rank_metrics, step3_metrics,
)
from slim_ray.generate.models import GenerationError
from slim_ray.generate.stage import PROMPT_ROW_SCHEMA, run_teach, write_batch
from slim_ray.generate.store import folder_totals, part_files
from slim_ray.prompts import parse_answer
from slim_ray.storage import read_parquet_file

MODEL = "smollm2-135m-instruct"
# item ids of gen_data.MOVIES: 3 Heat, 4 Godfather, 5 Star Wars, 6 Fargo, 8 Alien, 9 Casablanca,
# 10 Lion King, 11 Terminator, 12 Titanic


@pytest.fixture(scope="module")
def index() -> CatalogIndex:
    return CatalogIndex(items_table())


def test_exact_matches_normalised_titles(index):
    step3 = ("1. **The Godfather** (1972) - a crime epic\n"
             "2. Fargo (1996): a dark comedy\n"
             "3. Lion King, The (1994)\n"
             "4. \"Titanic\"")
    assert index.ground_detail(step3) == [
        ("The Godfather", 4, "exact"), ("Fargo (1996)", 6, "exact"),
        ("Lion King, The (1994)", 10, "exact"), ("Titanic", 12, "exact"),
    ]


def test_a_year_cut_short_by_the_token_budget_still_matches(index):
    assert index.ground("- Heat (1995)\n- Titanic (19") == [3, 12]
    assert index.match("Fargo (") == (6, "exact")


def test_fuzzy_matches_misspelt_titles_and_rejects_sequels(index):
    step3 = "- Terminatr (1984)\n- Lion King\n- Casablanka\n- Toy Story 2\n- Star Trek"
    detail = index.ground_detail(step3)
    assert [(i, how) for _, i, how in detail] == [(11, "fuzzy"), (10, "fuzzy"), (9, "fuzzy")]
    # "Toy Story 2" is a sequel, not Toy Story; "Star Trek" is not "Star Wars"
    assert index.match("Toy Story 2") == (None, None)
    assert index.match("Star Trek") == (None, None)
    assert index.match("Terminator (1991)")[0] is None  # a year far from the catalog's
    assert index.match("Terminator (1984)") == (11, "fuzzy")


def test_unmatched_and_mentioned_titles(index):
    assert index.ground("- The Matrix (1999)\n- Inception") == []
    assert index.ground("- Alien Resurrection") == []  # one unknown name, not a mention of Alien
    assert index.ground(None) == [] and index.ground("") == []
    # titles written inside a sentence, in the order named, each once; the article-suffix form too
    assert index.ground("I'd suggest Heat, Fargo and Alien. Heat is the best.") == [3, 6, 8]
    assert index.ground("You may like Godfather, The and Star Wars 2") == [4]  # "Star Wars 2": a sequel


def test_embedding_fallback_grounds_close_names_only():
    """With an encoder (the packaged all-MiniLM-L6-v2), a name no title matches exactly or fuzzily
    goes to the nearest title when the cosine clears min_cosine, and stays unmatched otherwise; the
    names of a batch are embedded in one pass, each once."""
    ix = CatalogIndex(items_table(), encoder="all-minilm-l6-v2", min_cosine=0.8)
    step3 = "- The Matrix (1999)\n- The Terminator movie\n- Titanic 1997 film\n- Fargo (1996)"
    cols = ix.ground_rows([step3, "- Casablanca classic\n- Jurassic Park"], [["Fargo"], []])
    assert cols["step3_item_ids"] == [[11, 12, 6], [9]] and cols["step3_n_history"] == [1, 0]
    assert ix.ground_detail(step3)[0] == ("The Terminator movie", 11, "embedding")
    assert ix.nearest["The Matrix (1999)"][0] is None and ix.nearest["The Matrix (1999)"][1] < 0.8
    assert set(ix.nearest) == {"The Matrix (1999)", "The Terminator movie", "Titanic 1997 film",
                               "Casablanca classic", "Jurassic Park"}  # exact matches are not embedded
    assert CatalogIndex(items_table()).ground(step3) == [6]  # off by default


def test_history_items_are_flagged(index):
    cols = index.ground_rows(
        ["- Heat (1995)\n- Fargo (1996)\n- Alien (1979)", "- The Matrix", None],
        [["Heat", "Godfather, The"], ["Heat"], ["Fargo"]],
    )
    assert cols == {"step3_item_ids": [[3, 6, 8], [], []], "step3_grounded": [True, False, False],
                    "step3_n_history": [1, 0, 0]}


def test_step3_metrics_by_hand():
    ids = [[5, 9, 3], [], [7, 1]]
    targets = [9, 4, 7]
    hist = [{3, 4}, {1}, set()]
    m = step3_metrics(ids, targets, hist, k=10)
    # user 1: target at rank 2 -> HR 1, NDCG 1/log2(3); user 2: nothing grounded; user 3: rank 1
    assert m["users"] == 3
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert m["share_grounded"] == pytest.approx(2 / 3)
    assert m["share_naming_history"] == pytest.approx(1 / 3)  # user 1 names item 3 of its history
    assert m["mean_grounded_items"] == pytest.approx(5 / 3)
    assert m["share_items_in_history"] == pytest.approx(1 / 5)
    # the cut-off: the target as the 11th distinct item is a miss at 10, a hit at 11
    assert rank_metrics(list(range(1, 12)), 11, k=10) == (0.0, 0.0)
    assert rank_metrics([1, 1, 2], 2, k=2) == (1.0, pytest.approx(1 / math.log2(3)))  # duplicates once


def _prompt_rows(users: list[int], history: list[list[str]]) -> pa.Table:
    n = len(users)
    return pa.table({
        "user_id": users, "rationale_key": [f"{u:064x}" for u in users], "prefix_len": [len(h) for h in history],
        "prompt": ["p"] * n, "messages_json": ["[]"] * n, "history_titles": history,
    }, schema=PROMPT_ROW_SCHEMA)


def test_writer_stores_ids_and_folder_shares(tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=4)
    cfg = load_config(None, [f"run_dir={run}"])
    out = cfg.layout.rationales("teacher")
    texts = [
        "Step 1: likes crime.\nStep 2: thrillers.\nStep 3:\n1. Heat (1995)\n2. Fargo (1996)",
        "Step 1: a.\nStep 2: b.\nStep 3: The Matrix and Inception",
        "Step 1: a.\nStep 2: b.\nStep 3:\n- Casablanka\n- Godfather, The (1972)",
    ]
    batch = _prompt_rows([1, 2, 3], [["Heat"], ["Alien"], ["Titanic"]]).append_column(
        "text", pa.array(texts)).append_column("error", pa.array([None] * 3, pa.string()))
    for c in ("n_prompt_tokens", "n_output_tokens"):
        batch = batch.append_column(c, pa.array([10, 20, 30], pa.int64()))
    summary = write_batch(batch, out_dir=out, role="teacher", model="m", prompt_version="v", engine="hf",
                          items_path=cfg.layout.items)
    assert summary["rows"].to_pylist() == [3]
    t = read_parquet_file(part_files(out)[0]).sort_by("user_id")
    assert t["step3_item_ids"].to_pylist() == [[3, 6], [], [9, 4]]
    assert t["step3_grounded"].to_pylist() == [True, False, True]
    assert t["step3_n_history"].to_pylist() == [1, 0, 0]
    tot = folder_totals(out)
    assert (tot["step3_grounded"], tot["step3_naming_history"], tot["step3_items"], tot["step3_history_items"]) == (2, 1, 4, 1)
    # the index is built once per process and path
    assert catalog_index(cfg.layout.items) is catalog_index(cfg.layout.items)

    # Step 3 as a recommender over the folder: sequences of gen_data (user u: ids (7u + 5k) % 12 + 1)
    rep = evaluate_folder(out, cfg.layout.sequences, cfg.layout.items, k=10)
    assert rep.metrics["users"] == 3 and rep.metrics["share_grounded"] == pytest.approx(2 / 3)
    assert rep.examples[0]["titles"] == ["Heat (1995)", "Fargo (1996)"]
    # user 1 (sequence 8, 1, 6, 11, 4; test target 4) is not recommended it; user 3 (sequence
    # 10, 3, 8, 1, 6, 11, 4; test target 4 = Godfather) names it second -> HR 1/3, NDCG 1/log2(3)/3
    assert rep.metrics["hr@10"] == pytest.approx(1 / 3)
    assert rep.metrics["ndcg@10"] == pytest.approx(1 / math.log2(3) / 3)
    # user 1 names Fargo (6), in its training prefix (8, 1, 6) but after its 1-item rationale cut
    assert rep.metrics["share_naming_history"] == pytest.approx(1 / 3)
    assert rep.metrics["share_naming_rationale_prefix"] == pytest.approx(0.0)


def test_constrain_step3_needs_the_hf_or_vllm_engine(tmp_path):
    run = str(tmp_path / "run")
    write_prepared(run, n_users=2)
    cfg = load_config(None, [f"run_dir={run}", "teacher.engine=openai", "teacher.constrain_step3=true"])
    with pytest.raises(GenerationError, match="constrain_step3.*hf and engine=vllm"):
        run_teach(cfg)


def _tokenizer():
    from transformers import AutoTokenizer

    from slim_ray.generate.models import resolve_model

    spec = resolve_model(load_config(None, []), load_config(None, [f"teacher.model={MODEL}"]).teacher)
    return AutoTokenizer.from_pretrained(spec.path), spec


def test_constraint_walk_names_only_new_catalog_items(index):
    """Random walks through the allowed tokens (the real tokenizer, no model): every walk that
    reaches the end names 1..n_recs catalog items, none of the history, each once."""
    import torch

    tok, _ = _tokenizer()
    end = tok.eos_token_id
    con = Step3Constraint(tok, items_table(), {end}, n_recs=3)
    history = [["Heat", "Fargo"], ["Star Wars", "Alien", "Titanic", "Casablanca"]]
    prompt = tok(["[user] hi", "[user] hi"], add_special_tokens=False)["input_ids"]
    width = max(len(p) for p in prompt)
    con.begin(history, width)
    rng = random.Random(0)
    free = tok("Step 1: x.\nStep 3:", add_special_tokens=False)["input_ids"]
    for b in range(2):
        seq = [0] * width + free
        for _ in range(80):
            allowed = con(b, torch.tensor(seq))
            allowed = allowed.tolist() if hasattr(allowed, "tolist") else list(allowed)
            t = rng.choice(allowed)
            seq.append(t)
            if t == end:
                break
        assert seq[-1] == end
        step3 = parse_answer(tok.decode(seq[width:], skip_special_tokens=True)).step3
        ids = index.ground(step3)
        hist = index.history_ids(history[b])
        assert 1 <= len(ids) <= 3 and not set(ids) & hist
        assert len(step3.splitlines()) == len(ids)  # one "- Title (year)" line per item
    # before "Step 3:" every token is allowed
    con.begin([[]], width)
    assert len(con(0, torch.tensor([0] * width + tok("Step 1:", add_special_tokens=False)["input_ids"]))) == len(tok)


def test_constrained_generate_with_the_packaged_model(tmp_path, index):
    """The hf engine with constrain_step3 (real SmolLM2-135M, transformers generate): after an
    answer prefix that ends in "Step 3:", the model may only name catalog items outside the
    user's history. (The 135M model rarely writes "Step 3:" on its own within a short budget, so
    the answer is started for it.)"""
    from slim_ray.generate.engines import HFEngine

    run = str(tmp_path / "run")
    write_prepared(run, n_users=2)
    cfg = load_config(None, [f"run_dir={run}", f"teacher.model={MODEL}"])
    _, spec = _tokenizer()
    eng = HFEngine(spec.path, {}, threads=2, constrain_items=cfg.layout.items, n_recs=3)
    tok = eng.tok
    history = [["Lion King, The", "Heat"], ["Star Wars", "Lion King, The", "Heat"]]
    msgs = [[{"role": "user", "content": f"I watched {', '.join(h)}. Recommend three movies."}] for h in history]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    width = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"].shape[1]
    enc = tok([t + "Step 1: Likes action.\nStep 2: Thrillers.\nStep 3:" for t in texts], return_tensors="pt",
              padding=True, add_special_tokens=False)
    assert enc["input_ids"].shape[1] > width
    eng.constraint.begin(history, width)
    out = eng.model.generate(**enc, max_new_tokens=36, do_sample=False, prefix_allowed_tokens_fn=eng.constraint,
                             pad_token_id=tok.pad_token_id)
    for h, row in zip(history, out[:, width:].tolist()):
        step3 = parse_answer(tok.decode(row, skip_special_tokens=True)).step3
        ids = index.ground(step3)
        assert ids and not set(ids) & index.history_ids(h), step3
        assert all(line.startswith("- ") for line in step3.splitlines())


def test_teach_with_constrained_step3_writes_grounding(ray_session, tmp_path):
    """The stage wiring: with constrain_step3 the hf actors get the catalog, the flag is part of
    rationale_key, the rows carry the grounding columns and the summary its shares."""
    from slim_ray.generate.engines import sampling_params
    from slim_ray.prompts import rationale_key

    run = str(tmp_path / "run")
    write_prepared(run, n_users=2)
    cfg = load_config(None, [f"run_dir={run}", f"teacher.model={MODEL}", "teacher.num_users=null",
                             "teacher.max_new_tokens=3", "teacher.constrain_step3=true"])
    s = run_teach(cfg)
    assert s["done_rows"] == 2 and s["failed_rows"] == 0
    out = s["output"]
    # 3 tokens never reach Step 3: nothing grounded, and the shares say so
    assert (out["share_step3_grounded"], out["share_step3_naming_history"], out["mean_step3_grounded_items"]) == (0.0, 0.0, 0.0)
    t = read_parquet_file(part_files(cfg.layout.rationales("teacher"))[0])
    assert t["step3_item_ids"].to_pylist() == [[], []] and t["step3_grounded"].to_pylist() == [False, False]
    params = sampling_params(cfg.teacher)
    assert params["constrain_step3"] is True
    free = {k: v for k, v in params.items() if k != "constrain_step3"}
    for r in t.to_pylist():
        assert r["rationale_key"] == rationale_key(r["model"], r["prompt_version"], params, r["prompt"])
        assert r["rationale_key"] != rationale_key(r["model"], r["prompt_version"], free, r["prompt"])
