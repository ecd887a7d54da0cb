"""Prompts: templates and versions, leakage guard, budget, parser. No Ray, no model."""

from __future__ import annotations

import pytest

from gen_data import MOVIES, items_table
from slim_ray.prompts import (
    PromptBuilder,
    build_student_prompt,
    cut_length,
    format_messages,
    load_template,
    parse_answer,
    parse_messages,
    parse_template,
    rationale_key,
    student_messages,
    teacher_messages,
    training_prefix,
)


def test_templates_are_versioned_files():
    t, s = load_template("teacher_cot"), load_template("student")
    assert t.version == "teacher-cot-v1" and s.version == "student-v1"
    with pytest.raises(ValueError, match="version"):
        parse_template("[user]\n{history}")
    with pytest.raises(ValueError, match="history"):
        parse_template("version: x\n[user]\nno placeholder")
    with pytest.raises(FileNotFoundError, match="teacher_cot"):
        load_template("nope")


def test_leakage_guard_uses_training_prefix_only():
    pb = PromptBuilder(items_table(), role="teacher", item_noun="movies", category_label="genres")
    seq = [1, 2, 3, 4, 5, 6]  # valid target 5 (Heat), test target 6 (Fargo)... ids are 1-based
    built = pb.build(seq)
    assert built.prefix_len == 4 == len(training_prefix(seq))
    assert built.prefix_len <= len(seq) - 2
    user = built.messages[-1]["content"]
    for i in (1, 2, 3, 4):
        assert MOVIES[i - 1][0] in user
    for i in (5, 6):  # validation and test items never reach the prompt
        assert MOVIES[i - 1][0] not in user
    assert built.history_titles == [MOVIES[i - 1][0] for i in (1, 2, 3, 4)]
    assert training_prefix([7, 8]) == [] and training_prefix([]) == []


def test_most_recent_first_and_token_budget():
    hist = [{"title": f"Movie {i:02d}", "year": 2000 + i, "categories": ["Drama"]} for i in range(30)]
    msgs = student_messages(hist, item_noun="movies", category_label="genres", max_items=50, token_budget=None)
    user = msgs[-1]["content"]
    assert user.index("1. Movie 29 (2029)") < user.index("2. Movie 28") < user.index("30. Movie 00")
    # ~4 chars/token without a tokenizer: each line is ~33 chars -> ~8 tokens; budget 40 -> 4-5 lines
    few = student_messages(hist, token_budget=40, count_tokens=lambda ls: [10] * len(ls))[-1]["content"]
    assert "4. Movie 26" in few and "5. Movie 25" not in few
    # never empty even when one line exceeds the budget
    one = student_messages(hist, token_budget=16, count_tokens=lambda ls: [100] * len(ls))[-1]["content"]
    assert "1. Movie 29" in one and "2. Movie 28" not in one
    assert "Movie 19" not in student_messages(hist, max_items=10, token_budget=None)[-1]["content"]


def test_item_rendering_and_messages_roundtrip():
    hist = [{"title": "Godfather, The (1972)", "categories": ["Crime", "Drama"], "brand": "Paramount", "year": 1972}]
    text = build_student_prompt(hist, item_noun="movies", category_label="genres")
    assert "1. Godfather, The (1972) | genres: Crime, Drama | brand: Paramount" in text
    assert "(1972) (1972)" not in text
    for msgs in (teacher_messages(hist), student_messages(hist)):
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert parse_messages(format_messages(msgs)) == msgs
    assert "Step 3" in teacher_messages(hist)[-1]["content"]


def test_rationale_key_covers_model_version_sampling_prompt():
    base = dict(model_id="m", prompt_version="v1", sampling={"t": 0.7}, prompt="p")
    k = rationale_key(**base)
    assert len(k) == 64 and k == rationale_key(**base)
    for change in ({"model_id": "m2"}, {"prompt_version": "v2"}, {"sampling": {"t": 0.8}}, {"prompt": "q"}):
        assert rationale_key(**{**base, **change}) != k


def test_parser_splits_steps_and_flags():
    hist = ["Godfather, The (1972)", "Toy Story (1995)", "Heat (1995)", "Up"]
    ans = ("**Step 1:** The user likes crime dramas.\n\n### Step 2 - Crime, Thriller; brands: Paramount\n"
           "Step 3) 1. The Godfather 2. Toy Story 2 3. Scarface")
    p = parse_answer(ans, hist)
    assert p.steps_found == 3 and p.complete
    assert p.step1 == "The user likes crime dramas."
    assert p.step2.startswith("Crime, Thriller")
    assert p.step3.startswith("1. The Godfather")
    # "The Godfather" re-recommends "Godfather, The"; "Toy Story 2" is a sequel, not a repeat;
    # "Heat" does not occur; "Up" is too short to match reliably
    assert p.seen_items == ["Godfather, The (1972)"]
    missing = parse_answer("Step 1: likes action. Step 3: Heat", hist)
    assert missing.steps_found == 2 and missing.step2 is None and not missing.complete
    assert missing.seen_items == ["Heat (1995)"]
    echo = parse_answer("Step 1: The user watched:\n1. Heat (1995)\n2. Toy Story (1995)", hist)
    assert echo.steps_found == 1 and echo.seen_items == []  # restating the history is not recommending
    none = parse_answer("I recommend Casablanca.", hist)
    assert none.steps_found == 0 and none.seen_items == []


# c for L = 1..12 with the defaults (tail fraction 0.2, at least 3 targets after the cut), by hand:
# L=1..4 -> 1 (too short for a tail of 3: one item kept); L=5 -> min(2, 4) = 2; L=6 -> min(3, 4) = 3;
# L=8 -> min(5, 6) = 5; L=10 -> min(7, 8) = 7; L=12 -> min(9, 9) = 9
CONSISTENT_C = {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6, 10: 7, 11: 8, 12: 9}


@pytest.mark.parametrize("n_train", sorted(CONSISTENT_C))
def test_consistent_cut_shows_only_the_first_c_items(n_train):
    # n_train training items (ids 1..n_train, distinct titles), then the valid and test targets
    seq = list(range(1, n_train + 1)) + [11, 12]
    pb = PromptBuilder(items_table(), role="teacher", item_noun="movies", category_label="genres",
                       max_items=50, token_budget=None, cut="consistent", tail_fraction=0.2, min_tail=3)
    built = pb.build(seq)
    c = CONSISTENT_C[n_train]
    assert built.prefix_len == c == len(training_prefix(seq, "consistent", 0.2, 3)), (n_train, built.prefix_len)
    assert built.prefix_len <= len(seq) - 2  # the leakage guard still holds
    user = built.messages[-1]["content"]
    shown = [MOVIES[i - 1][0] for i in seq[:c]]
    hidden = [MOVIES[i - 1][0] for i in seq[c:]]
    assert all(t in user for t in shown), (c, user)
    assert not any(t in user for t in hidden), (c, hidden, user)
    assert built.n_shown == c and built.history_titles == [f"{t}" for t in shown]
    if n_train >= 3 + 2:  # long enough: at least min_tail training targets after the cut
        assert n_train - c >= 3


@pytest.mark.parametrize("n_train", [1, 4, 7, 10])
def test_full_prefix_cut_keeps_the_whole_training_prefix(n_train):
    seq = list(range(1, n_train + 1)) + [11, 12]
    pb = PromptBuilder(items_table(), role="student", token_budget=None, cut="full_prefix")
    built = pb.build(seq)
    assert built.prefix_len == n_train == len(training_prefix(seq))
    assert MOVIES[10][0] not in built.prompt and MOVIES[11][0] not in built.prompt  # valid/test never


def test_cut_edge_cases():
    assert cut_length(0, "consistent") == 0 and training_prefix([1, 2], "consistent") == []
    assert cut_length(100, "consistent", 0.2, 3) == 80 and cut_length(100, "consistent", 0.0, 3) == 97
    assert cut_length(10, "consistent", 0.5, 0) == 5 and cut_length(10, "consistent", 0.0, 0) == 10
    with pytest.raises(ValueError, match="unknown rationale cut"):
        PromptBuilder(items_table(), cut="nope")
