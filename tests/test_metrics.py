"""Tests for multitune.metrics: hand-computed values, edge cases, and parity with independent formulas."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from multitune import metrics
from multitune.metrics import (
    METRIC_DIRECTIONS,
    accuracy,
    bootstrap_interval,
    classification_metrics,
    exact_match,
    generation_metrics,
    is_better,
    macro_f1,
    normalize_answer,
    perplexity,
    rouge_l,
)

# ---------------------------------------------------------------------------------------------------------
# accuracy


def test_accuracy_hand_computed() -> None:
    assert accuracy(["a", "b", "c", "a"], ["a", "b", "a", "b"]) == pytest.approx(0.5)


def test_accuracy_perfect_and_zero() -> None:
    assert accuracy(["x", "y"], ["x", "y"]) == 1.0
    assert accuracy(["x", "y"], ["y", "x"]) == 0.0


def test_accuracy_is_exact_string_comparison() -> None:
    assert accuracy(["Yes", "no "], ["yes", "no"]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# macro-F1

# refs:  a a a b b c
# preds: a a b b c c
#   a: TP=2 FP=0 FN=1 -> F1 = 2*2 / (2*2 + 0 + 1) = 4/5
#   b: TP=1 FP=1 FN=1 -> F1 = 2 / (2 + 1 + 1)     = 1/2
#   c: TP=1 FP=1 FN=0 -> F1 = 2 / (2 + 1 + 0)     = 2/3
#   macro = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 90 = 59/90
REFS_3 = ["a", "a", "a", "b", "b", "c"]
PREDS_3 = ["a", "a", "b", "b", "c", "c"]


def _macro_f1_via_precision_recall(preds: list[str], refs: list[str], labels: list[str]) -> float:
    """scikit-learn's formula written out: F1 = 2PR / (P + R), with P or R = 0 when undefined."""
    scores = []
    for c in labels:
        tp = sum(p == c and r == c for p, r in zip(preds, refs, strict=True))
        n_pred = sum(p == c for p in preds)
        n_ref = sum(r == c for r in refs)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_ref if n_ref else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def test_macro_f1_hand_computed_three_classes() -> None:
    assert macro_f1(PREDS_3, REFS_3) == pytest.approx(59 / 90)
    assert macro_f1(PREDS_3, REFS_3) == pytest.approx(
        _macro_f1_via_precision_recall(PREDS_3, REFS_3, ["a", "b", "c"])
    )


def test_macro_f1_matches_precision_recall_formula_on_random_labels() -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 30)
        refs = [rng.choice("abcd") for _ in range(n)]
        preds = [rng.choice("abcd") for _ in range(n)]
        present = sorted(set(refs) | set(preds))
        assert macro_f1(preds, refs) == pytest.approx(_macro_f1_via_precision_recall(preds, refs, present))


def test_macro_f1_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    for _ in range(20):
        refs = [rng.choice("abc") for _ in range(25)]
        preds = [rng.choice("abc") for _ in range(25)]
        present = sorted(set(refs) | set(preds))
        expected = sklearn_metrics.f1_score(refs, preds, labels=present, average="macro", zero_division=0)
        assert macro_f1(preds, refs) == pytest.approx(expected)


def test_macro_f1_skips_labels_absent_from_both() -> None:
    # "z" never occurs: it is skipped rather than averaged in as 0.
    assert macro_f1(PREDS_3, REFS_3, labels=["a", "b", "c", "z"]) == pytest.approx(59 / 90)


def test_macro_f1_restricted_labels() -> None:
    # Only a and b are averaged: (4/5 + 1/2) / 2.
    assert macro_f1(PREDS_3, REFS_3, labels=["a", "b"]) == pytest.approx(0.65)


def test_macro_f1_predicted_only_class_counts_as_zero() -> None:
    # "b" is predicted but never a reference: F1_b = 0; F1_a = 2*1/(2+0+1) = 2/3.
    assert macro_f1(["a", "b"], ["a", "a"]) == pytest.approx((2 / 3 + 0) / 2)


def test_macro_f1_perfect_zero_and_empty() -> None:
    assert macro_f1(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert macro_f1(["b", "a"], ["a", "b"]) == 0.0
    assert math.isnan(macro_f1([], []))
    assert math.isnan(macro_f1(["a"], ["a"], labels=["z"]))


# ---------------------------------------------------------------------------------------------------------
# exact match and normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel-Tower!", "eiffeltower"),
        ("  A cat, an apple and THE dog. ", "cat apple and dog"),
        ("theory of anything", "theory of anything"),  # articles only as whole words
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_hand_computed() -> None:
    preds = ["The Cat.", "paris", "42", "a dog"]
    refs = ["cat", "Paris!", "forty-two", "the  dog"]
    assert exact_match(preds, refs) == pytest.approx(3 / 4)


def test_exact_match_perfect_and_zero() -> None:
    assert exact_match(["yes"], ["Yes."]) == 1.0
    assert exact_match(["no"], ["yes"]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L


def _lcs_brute_force(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by enumerating every subsequence of the shorter list."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for k in range(len(short), 0, -1):
        for combo in itertools.combinations(short, k):
            it = iter(long_)
            if all(token in it for token in combo):
                return k
    return 0


def test_rouge_l_hand_computed_deletion() -> None:
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 tokens.
    # P = 5/6, R = 5/5 -> F = 2 * (5/6) * 1 / (5/6 + 1) = 10/11.
    assert rouge_l(["the cat sat on the mat"], ["the cat on the mat"]) == pytest.approx(10 / 11)
    # Symmetric in P and R with beta = 1.
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)


def test_rouge_l_hand_computed_reordering() -> None:
    # Lin (2004)'s example: pred "police killed the gunman", ref "the gunman killed police".
    # LCS = 2 ("the gunman"; "police killed" appears in the other order in the ref), so P = R = 2/4, F = 1/2.
    assert rouge_l(["police killed the gunman"], ["the gunman killed police"]) == pytest.approx(0.5)


def test_rouge_l_case_and_punctuation_insensitive() -> None:
    assert rouge_l(["The CAT, sat!"], ["the cat sat"]) == 1.0


def test_rouge_l_mean_over_examples() -> None:
    preds = ["the cat sat on the mat", "hello world", "x"]
    refs = ["the cat on the mat", "hello world", "y"]
    assert rouge_l(preds, refs) == pytest.approx((10 / 11 + 1.0 + 0.0) / 3)


def test_rouge_l_empty_strings() -> None:
    assert rouge_l([""], [""]) == 1.0
    assert rouge_l(["..."], ["  "]) == 1.0  # no word tokens on either side
    assert rouge_l([""], ["something"]) == 0.0
    assert rouge_l(["something"], [""]) == 0.0


def test_lcs_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert metrics._lcs_length(a, b) == _lcs_brute_force(a, b)


# ---------------------------------------------------------------------------------------------------------
# input validation shared by the sequence metrics

SEQUENCE_METRICS = [accuracy, macro_f1, exact_match, rouge_l, classification_metrics, generation_metrics]


@pytest.mark.parametrize("fn", SEQUENCE_METRICS)
def test_mismatched_lengths_raise_with_both_lengths(fn: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match=r"3 predictions, 2 references") as info:
        fn(["a", "b", "c"], ["a", "b"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fn", SEQUENCE_METRICS)
def test_single_string_is_rejected(fn: Callable[..., Any]) -> None:
    with pytest.raises(TypeError, match="not one string"):
        fn("abc", ["a", "b", "c"])


@pytest.mark.parametrize("fn", [accuracy, exact_match, rouge_l])
def test_empty_inputs_give_nan(fn: Callable[..., Any]) -> None:
    assert math.isnan(fn([], []))


def test_classification_and_generation_metrics() -> None:
    cls = classification_metrics(PREDS_3, REFS_3)
    assert set(cls) == {"accuracy", "macro_f1"}
    assert cls["accuracy"] == pytest.approx(4 / 6)
    assert cls["macro_f1"] == pytest.approx(59 / 90)
    assert classification_metrics(PREDS_3, REFS_3, labels=["a", "b"])["macro_f1"] == pytest.approx(0.65)

    gen = generation_metrics(["The cat sat on the mat", "Paris"], ["the cat on the mat", "paris."])
    assert set(gen) == {"exact_match", "rouge_l"}
    assert gen["exact_match"] == pytest.approx(0.5)
    assert gen["rouge_l"] == pytest.approx((10 / 11 + 1.0) / 2)


# ---------------------------------------------------------------------------------------------------------
# perplexity


def test_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert math.isnan(perplexity(3.0, 0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens"):
        perplexity(1.0, -1)


# ---------------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_contains_mean() -> None:
    rng = np.random.default_rng(123)
    scores = rng.binomial(1, 0.7, size=200).astype(float).tolist()
    low, high = bootstrap_interval(scores)
    assert low <= float(np.mean(scores)) <= high
    assert 0.0 <= low < high <= 1.0


def test_bootstrap_narrows_with_more_data() -> None:
    rng = np.random.default_rng(7)
    small = rng.normal(size=50).tolist()
    large = rng.normal(size=5000).tolist()
    small_low, small_high = bootstrap_interval(small)
    large_low, large_high = bootstrap_interval(large)
    # Width scales like 1/sqrt(N): expect about 10x narrower; require at least 5x.
    assert (large_high - large_low) * 5 < small_high - small_low


def test_bootstrap_width_grows_with_confidence() -> None:
    scores = np.random.default_rng(3).normal(size=100).tolist()
    low90, high90 = bootstrap_interval(scores, confidence=0.90)
    low99, high99 = bootstrap_interval(scores, confidence=0.99)
    assert low99 <= low90 and high90 <= high99


def test_bootstrap_deterministic_with_seed() -> None:
    scores = np.random.default_rng(0).uniform(size=100).tolist()
    assert bootstrap_interval(scores, seed=5) == bootstrap_interval(scores, seed=5)
    assert bootstrap_interval(scores, seed=5) != bootstrap_interval(scores, seed=6)


def test_bootstrap_chunking_does_not_change_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # A larger chunk draws all resamples at once; the interval must be the same as with several chunks.
    scores = np.random.default_rng(0).uniform(size=100).tolist()
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK_ELEMENTS", 1_000)
    chunked = bootstrap_interval(scores, n_resamples=500)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK_ELEMENTS", 10_000_000)
    whole = bootstrap_interval(scores, n_resamples=500)
    assert chunked == pytest.approx(whole)


def test_bootstrap_edge_cases() -> None:
    low, high = bootstrap_interval([])
    assert math.isnan(low) and math.isnan(high)
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    assert bootstrap_interval([2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_interval([1.0, 2.0], n_resamples=0)


# ---------------------------------------------------------------------------------------------------------
# is_better


def test_metric_directions() -> None:
    assert METRIC_DIRECTIONS == {
        "accuracy": "max",
        "macro_f1": "max",
        "exact_match": "max",
        "rouge_l": "max",
        "perplexity": "min",
        "loss": "min",
    }


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "exact_match", "rouge_l"])
def test_is_better_max_metrics(metric: str) -> None:
    assert is_better(metric, 0.8, 0.7)
    assert not is_better(metric, 0.6, 0.7)
    assert not is_better(metric, 0.7, 0.7)  # ties keep the earlier best


@pytest.mark.parametrize("metric", ["perplexity", "loss"])
def test_is_better_min_metrics(metric: str) -> None:
    assert is_better(metric, 1.5, 2.0)
    assert not is_better(metric, 2.5, 2.0)
    assert not is_better(metric, 2.0, 2.0)


@pytest.mark.parametrize("metric", sorted(METRIC_DIRECTIONS))
def test_is_better_none_and_nan(metric: str) -> None:
    assert is_better(metric, 0.1, None)
    assert is_better(metric, 0.1, math.nan)
    assert not is_better(metric, math.nan, None)
    assert not is_better(metric, math.nan, 0.5)


def test_is_better_unknown_metric_names_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown metric 'bleu'") as info:
        is_better("bleu", 1.0, 0.0)
    for name in METRIC_DIRECTIONS:
        assert name in str(info.value)
