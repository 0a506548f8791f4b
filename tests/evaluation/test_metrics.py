"""Tests for the text metrics (deepsynth.data.metrics, importable from deepsynth.evaluation): hand-worked SQuAD and ROUGE cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsynth.evaluation import (
    ablation_summary,
    aggregate,
    exact_match,
    f1_score,
    normalize_answer,
    rouge_scores,
)
from deepsynth.data.metrics import _rouge_scorer, _split_sentences

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  Eiffel   tower ", "eiffel tower"),
        ("A cat, an owl and THE dog.", "cat owl and dog"),
        ("theater", "theater"),  # articles only as whole words
        ("another anthem", "another anthem"),
        ("the-end", "theend"),  # punctuation removed before articles (official order)
        ("", ""),
        ("the a an", ""),
        ("U.S.A.", "usa"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# --------------------------------------------------------------------------- EM / F1


def test_exact_match_ignores_case_punct_articles():
    assert exact_match("the Eiffel Tower!", "Eiffel tower") == 1.0


def test_in_1889_vs_1889():
    assert exact_match("in 1889", "1889") == 0.0
    # precision 1/2, recall 1/1 -> 2 * 0.5 * 1 / 1.5
    assert f1_score("in 1889", "1889") == pytest.approx(2 * (1 * 0.5) / (1 + 0.5))
    assert f1_score("in 1889", "1889") == pytest.approx(0.6667, abs=1e-4)


def test_partial_overlap_f1():
    # pred tokens: [big, red, barn]; gold: [red, barn, door, frame]
    # common 2 -> p = 2/3, r = 2/4 -> F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert f1_score("a big red barn", "the red barn door frame") == pytest.approx(4 / 7)


def test_repeated_tokens_count_with_multiplicity():
    # pred [paris, paris]; gold [paris] -> common 1, p = 1/2, r = 1 -> 2/3
    assert f1_score("paris paris", "paris") == pytest.approx(2 / 3)


def test_multiple_golds_take_the_max():
    golds = ["London", "Paris, France", "the city of Paris"]
    assert exact_match("Paris, France.", golds) == 1.0
    assert exact_match("Paris", golds) == 0.0
    # best: "city of paris" -> p = 1, r = 1/3 -> 0.5; "paris france" -> p=1, r=1/2 -> 2/3
    assert f1_score("Paris", golds) == pytest.approx(2 / 3)
    assert f1_score("Paris", ("London",)) == 0.0


def test_no_overlap():
    assert exact_match("blue", "red") == 0.0
    assert f1_score("blue", "red") == 0.0


@pytest.mark.parametrize(
    "pred, gold, em, f1",
    [
        ("", "", 1.0, 1.0),
        ("", "the", 1.0, 1.0),  # both normalise to no tokens
        ("!!", "a", 1.0, 1.0),
        ("", "Paris", 0.0, 0.0),
        ("Paris", "", 0.0, 0.0),
        ("the", "Paris", 0.0, 0.0),
    ],
)
def test_empty_cases(pred, gold, em, f1):
    assert exact_match(pred, gold) == em
    assert f1_score(pred, gold) == f1


def test_bad_input_errors_name_the_field():
    with pytest.raises(ValueError, match="gold_answers"):
        f1_score("x", [])
    with pytest.raises(TypeError, match="prediction"):
        exact_match(None, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"gold_answers\[1\]"):
        exact_match("x", ["x", 3])  # type: ignore[list-item]


_words = st.lists(
    st.sampled_from(["the", "a", "cat", "Cat", "dog,", "1889", "an", "red!", "theater"]),
    max_size=6,
).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(_words, _words)
def test_properties(pred, gold):
    em, f1 = exact_match(pred, gold), f1_score(pred, gold)
    assert 0.0 <= em <= f1 <= 1.0
    assert f1 == pytest.approx(f1_score(gold, pred))  # symmetric for one gold
    assert normalize_answer(normalize_answer(pred)) == normalize_answer(pred)
    assert exact_match(pred, pred) == 1.0 and f1_score(pred, pred) == 1.0


# --------------------------------------------------------------------------- ROUGE


def test_rouge_identical_is_one():
    text = "The quick brown fox jumps over the lazy dog. It was not amused!"
    scores = rouge_scores(text, text)
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert all(v == pytest.approx(1.0) for v in scores.values())


def test_rouge_disjoint_is_zero():
    scores = rouge_scores("alpha beta gamma", "delta epsilon zeta")
    assert all(v == 0.0 for v in scores.values())


def test_rouge_stemming():
    assert rouge_scores("running", "run")["rouge1"] == pytest.approx(1.0)
    assert rouge_scores("dogs running fast", "dog runs fast")["rouge2"] == pytest.approx(1.0)


def test_rouge_hand_computed():
    # unigrams: 2/3 shared; bigrams {the cat, cat sat} vs {the cat, cat ran}: 1/2; LCS 2/3
    s = rouge_scores("the cat sat", "the cat ran")
    assert s["rouge1"] == pytest.approx(2 / 3)
    assert s["rouge2"] == pytest.approx(1 / 2)
    assert s["rougeL"] == pytest.approx(2 / 3)
    assert s["rougeLsum"] == pytest.approx(2 / 3)


def test_rouge_lsum_uses_sentence_split():
    # Sentences swapped: flat LCS of "a b c d" vs "c d a b" is 2 -> 0.5,
    # summary-level LCS matches each sentence fully -> 1.0.
    s = rouge_scores("Alpha beta. Gamma delta.", "Gamma delta. Alpha beta.")
    assert s["rougeL"] == pytest.approx(0.5)
    assert s["rougeLsum"] == pytest.approx(1.0)


def test_split_sentences():
    assert _split_sentences("One. Two! Three? Four") == "One.\nTwo!\nThree?\nFour"
    assert _split_sentences("  3.14 is pi.  ") == "3.14 is pi."
    assert _split_sentences("") == ""


def test_rouge_best_over_references():
    s = rouge_scores("the cat sat", ["delta epsilon", "the cat sat"])
    assert s["rouge1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference"):
        rouge_scores("x", [])


def test_rouge_scorer_cached():
    assert _rouge_scorer() is _rouge_scorer()


# --------------------------------------------------------------------------- aggregate


def test_aggregate_em_f1_hand_computed():
    preds = ["the Eiffel Tower!", "in 1889", "Paris", ""]
    refs = ["Eiffel tower", "1889", ["London", "paris, France"], "blue"]
    # EM: 1, 0, 0, 0 -> 0.25 ; F1: 1, 2/3, 2/3, 0 -> 7/12
    out = aggregate(preds, refs)
    assert out == {"em": pytest.approx(0.25), "f1": pytest.approx(7 / 12), "n": 4}


def test_aggregate_with_rouge():
    out = aggregate(
        ["the cat sat", "alpha beta"], ["the cat ran", "gamma delta"], metrics=("f1", "rouge")
    )
    assert out["n"] == 2
    assert set(out) == {"f1", "rouge1", "rouge2", "rougeL", "rougeLsum", "n"}
    # SQuAD F1 drops "the": "cat sat" vs "cat ran" -> 1/2; ROUGE keeps it -> 2/3
    assert out["f1"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["rouge1"] == pytest.approx(1 / 3)
    assert out["rouge2"] == pytest.approx(1 / 4)
    assert out["rougeL"] == pytest.approx(1 / 3)
    only_l = aggregate(["the cat sat"], ["the cat ran"], metrics=("rougeL",))
    assert set(only_l) == {"rougeL", "n"}


def test_aggregate_errors():
    with pytest.raises(ValueError, match="same length"):
        aggregate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        aggregate([], [])
    with pytest.raises(ValueError, match="unknown metric"):
        aggregate(["a"], ["a"], metrics=("bleu",))
    with pytest.raises(ValueError, match=r"references\[0\]"):
        aggregate(["a"], [[]])


# --------------------------------------------------------------------------- ablation


def test_ablation_summary():
    out = ablation_summary(0.8, 0.3, 0.25)
    assert out["score"] == 0.8
    assert out["score_no_instruction"] == 0.3
    assert out["chance"] == 0.25
    assert out["drop"] == pytest.approx(0.5)
    assert out["above_chance_without_instruction"] == pytest.approx(0.05)
