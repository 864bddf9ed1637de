"""Evaluation metrics for classification, generation and language modelling, in pure Python and numpy.

Every metric takes parallel sequences of predicted and reference strings and returns one float; the
per-task evaluator picks the metrics, and :func:`is_better` decides whether a new value improves on the best
so far (for early stopping and checkpoint selection). The definitions follow the usual references so numbers
compare with published ones:

* accuracy, macro-F1: as in scikit-learn (``accuracy_score``, ``f1_score(average="macro")``) on string labels;
* exact match: the SQuAD v1.1 evaluation script (Rajpurkar et al., 2016), answers normalised first;
* ROUGE-L: sentence-level LCS F-measure (Lin, 2004, section 3.1) with beta = 1;
* perplexity: exp of the mean per-token negative log-likelihood;
* confidence intervals: the percentile bootstrap of the mean (Efron & Tibshirani, 1993, ch. 13).

Empty inputs give ``nan`` rather than an exception, so a task with no evaluation rows shows up as missing
instead of stopping a multi-task run; mismatched lengths are a bug upstream and raise ``ValueError``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = [
    "METRIC_DIRECTIONS",
    "accuracy",
    "bootstrap_interval",
    "classification_metrics",
    "exact_match",
    "generation_metrics",
    "is_better",
    "macro_f1",
    "normalize_answer",
    "perplexity",
    "rouge_l",
]

METRIC_DIRECTIONS: dict[str, str] = {
    "accuracy": "max",
    "macro_f1": "max",
    "exact_match": "max",
    "rouge_l": "max",
    "perplexity": "min",
    "loss": "min",
}
"""Whether a higher (``"max"``) or lower (``"min"``) value of each metric is better."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"\w+")
# Rows of resampled indices drawn at once by the bootstrap: bounds memory at about 8 MB per chunk of int64s.
_BOOTSTRAP_CHUNK_ELEMENTS = 1_000_000


def _check_pair(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise if the two sequences cannot be compared element by element."""
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a sequence of strings, not one string; wrap it in a list")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} predictions, "
            f"{len(references)} references"
        )


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of exact string matches.

    .. math:: \\mathrm{acc} = \\frac{1}{N} \\sum_{i=1}^{N} [p_i = r_i]

    Strings are compared as given (no case folding or stripping); normalise labels before calling.
    Returns ``nan`` for empty inputs.
    """
    _check_pair(predictions, references)
    if not predictions:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)


def macro_f1(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Unweighted mean of the per-class F1 scores.

    For class :math:`c` with true positives :math:`TP_c`, false positives :math:`FP_c` and false negatives
    :math:`FN_c`,

    .. math:: F1_c = \\frac{2\\,TP_c}{2\\,TP_c + FP_c + FN_c}, \\qquad
              \\mathrm{macro\\text{-}F1} = \\frac{1}{|C|} \\sum_{c \\in C} F1_c

    which equals the harmonic mean of precision and recall, and is 0 when :math:`TP_c = 0`. ``labels``
    defaults to the union of predicted and reference labels. :math:`C` holds only the classes of ``labels``
    that occur in the predictions or the references: a class with neither contributes no evidence and is
    skipped (scikit-learn would count it as 0 and warn). A prediction outside ``labels`` still counts as a
    false negative for its reference class. Returns ``nan`` when :math:`C` is empty.
    """
    _check_pair(predictions, references)
    pred_counts = Counter(predictions)
    ref_counts = Counter(references)
    true_positives = Counter(p for p, r in zip(predictions, references, strict=True) if p == r)
    classes = (
        list(dict.fromkeys([*references, *predictions])) if labels is None else list(dict.fromkeys(labels))
    )
    scores = []
    for label in classes:
        tp = true_positives[label]
        fp = pred_counts[label] - tp
        fn = ref_counts[label] - tp
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    if not scores:
        return float("nan")
    return sum(scores) / len(scores)


def normalize_answer(text: str) -> str:
    """Normalise an answer as the SQuAD v1.1 evaluation script does.

    Lower-case, delete every character of ``string.punctuation``, drop the English articles *a*, *an*,
    *the* as whole words, and collapse runs of whitespace to single spaces (stripping both ends).
    ``"The  Eiffel-Tower!"`` becomes ``"eiffeltower"``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after :func:`normalize_answer`.

    .. math:: \\mathrm{EM} = \\frac{1}{N} \\sum_{i=1}^{N} [\\mathrm{norm}(p_i) = \\mathrm{norm}(r_i)]

    Returns ``nan`` for empty inputs.
    """
    _check_pair(predictions, references)
    if not predictions:
        return float("nan")
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD token F1: the harmonic mean of precision and recall of the normalised answer's tokens
    (counted with multiplicity) against the reference's; two empty answers score 1. ``nan`` for no rows."""
    _check_pair(predictions, references)
    if not predictions:
        return float("nan")
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        pred, ref = normalize_answer(p).split(), normalize_answer(r).split()
        if not pred or not ref:
            total += float(pred == ref)
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            total += 2 * precision * recall / (precision + recall)
    return total / len(predictions)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming in O(|a| |b|) time, O(|b|) memory.

    ``L[i][j] = L[i-1][j-1] + 1`` if ``a[i-1] == b[j-1]`` else ``max(L[i-1][j], L[i][j-1])``; only the
    previous and current rows are kept.
    """
    if len(b) > len(a):
        a, b = b, a  # keep the rows as short as possible
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0] * (len(b) + 1)
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l_sentence(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction against one reference (see :func:`rouge_l`)."""
    pred_tokens = _WORD.findall(prediction.lower())
    ref_tokens = _WORD.findall(reference.lower())
    if not pred_tokens and not ref_tokens:
        return 1.0
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred_tokens)
    recall = lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (Lin, 2004, section 3.1, with beta = 1).

    Each text is lower-cased and split into word tokens with ``re.findall(r"\\w+")``. For prediction
    :math:`X` of :math:`n` tokens and reference :math:`Y` of :math:`m` tokens,

    .. math:: P = \\frac{\\mathrm{LCS}(X, Y)}{n}, \\quad R = \\frac{\\mathrm{LCS}(X, Y)}{m}, \\quad
              F = \\frac{2 P R}{P + R}

    with :math:`F = 0` when the LCS is empty. Two empty texts score 1; an empty text against a non-empty one
    scores 0. No stemming, so scores can be a little below those of ``rouge-score`` with its stemmer on.
    Returns ``nan`` for empty inputs.
    """
    _check_pair(predictions, references)
    if not predictions:
        return float("nan")
    total = sum(rouge_l_sentence(p, r) for p, r in zip(predictions, references, strict=True))
    return total / len(predictions)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Perplexity from a summed negative log-likelihood (natural log) over ``n_tokens`` tokens.

    .. math:: \\mathrm{PPL} = \\exp\\Big(\\frac{1}{T} \\sum_{t=1}^{T} -\\log p(x_t \\mid x_{<t})\\Big)

    Returns ``nan`` when ``n_tokens`` is 0 and ``inf`` when the exponent overflows.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return float("nan")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return float("inf")


def bootstrap_interval(
    per_example: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval for the mean of per-example scores.

    Draw ``n_resamples`` samples of size :math:`N` with replacement from the :math:`N` scores, take each
    sample's mean :math:`\\bar x^*_b`, and return the :math:`\\alpha/2` and :math:`1-\\alpha/2` percentiles
    (linear interpolation) of :math:`\\{\\bar x^*_b\\}`, where :math:`\\alpha = 1 - \\text{confidence}`.
    Resampling uses ``numpy.random.default_rng(seed)``, so equal inputs and seed give equal intervals.
    Returns ``(nan, nan)`` for empty input.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    values = np.asarray(per_example, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"per_example must be one-dimensional, got shape {values.shape}")
    n = values.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))  # (rows, N)
        means[start:stop] = values[indices].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.percentile(means, [100.0 * alpha / 2, 100.0 * (1 - alpha / 2)])
    return float(low), float(high)


def classification_metrics(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class labels: ``{"accuracy": ..., "macro_f1": ...}``."""
    return {
        "accuracy": accuracy(predictions, references),
        "macro_f1": macro_f1(predictions, references, labels),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and ROUGE-L of generated text: ``{"exact_match": ..., "rouge_l": ...}``."""
    return {
        "exact_match": exact_match(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


def is_better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` strictly improves on ``old`` for ``metric``, by :data:`METRIC_DIRECTIONS`.

    ``old`` of ``None`` (no best yet) or ``nan`` is beaten by any non-``nan`` value; a ``nan`` ``new`` never
    wins; ties do not count as improvements, so the earliest best checkpoint is kept.
    """
    direction = METRIC_DIRECTIONS.get(metric)
    if direction is None:
        known = ", ".join(sorted(METRIC_DIRECTIONS))
        raise ValueError(f"unknown metric {metric!r}; known metrics: {known}")
    if math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if direction == "max" else new < old
