"""Did a run learn? A classification run that did not is told apart from one that learned a little.

A run did not learn when the weights it ends with (its best validation) predict one label for every
validation example although the validation data holds several, or when its validation loss never went
below the chance level: the cross-entropy of predicting the label prior, ``H(prior)`` (``ln K`` for K
balanced labels), less :data:`CHANCE_MARGIN` of it. Without validation data, the training loss of the
last steps stands in. Its accuracy is then the prior's, not the method's quality on the task: ``train``
says so (last line, result.json) with the likely cause and the fix, and ``compare`` tries to rescue it.

The cause (:func:`cause_of`) is read from the run's own curves, since the two usual ones need opposite fixes:
``overshoot`` when the training loss climbed well above where it started (updates too large: the model settles
on the label prior), ``slow`` when the validation loss was still falling at the last evaluation or, without
validation, the training loss was (too few updates: a small data set at a small learning rate fits the prior
first and has not yet moved the rarer labels' scores past it). Anything else counts as ``overshoot``.

Generation runs are not judged here: a language model's loss has no chance level to compare with.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from multitune.data import Example

CHANCE_MARGIN = 0.05  # a loss within 5% of the chance level is the chance level
TAIL = 0.1  # without validation: the last 10% of the steps' training loss
OVERSHOOT = 1.5  # a training loss (smoothed over a tenth of the run) this far above its start overshot


def chance_loss(labels: Sequence[str]) -> float:
    """The cross-entropy of predicting the empirical label distribution of ``labels`` for every example."""
    counts = Counter(labels)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def not_learned(
    history: Sequence[dict[str, Any]],
    best_step: int | None,
    validation: Sequence[Example],
    train: Sequence[Example],
    log: Sequence[dict[str, Any]] = (),
) -> str | None:
    """Why a classification run did not learn (one clause), or None when it did or it cannot be told."""
    if validation and history:
        labels = [ex.label or "" for ex in validation]
        best = next((r for r in history if r.get("step") == best_step), history[-1])
        if best.get("predicted_labels") == 1 and len(set(labels)) > 1:
            return (
                f"its weights predict one label for every validation example (accuracy {best['accuracy']:.3f}, "
                "the share of that label)"
            )
        chance = chance_loss(labels)
        losses = [float(r["loss"]) for r in history if "loss" in r and not math.isnan(float(r["loss"]))]
        if losses and chance > 0 and min(losses) >= (1 - CHANCE_MARGIN) * chance:
            return (
                f"its validation loss never went below the chance level (best {min(losses):.3f}; predicting "
                f"the label prior gives {chance:.3f})"
            )
        return None
    steps = [float(r["loss"]) for r in log if "loss" in r]
    chance = chance_loss([ex.label or "" for ex in train])
    if not steps or chance <= 0:
        return None
    tail = steps[-max(1, int(len(steps) * TAIL)) :]
    mean = sum(tail) / len(tail)
    if mean >= (1 - CHANCE_MARGIN) * chance:
        return (
            f"its training loss stayed at the chance level (last steps {mean:.3f}; predicting the label prior "
            f"gives {chance:.3f})"
        )
    return None


def cause_of(history: Sequence[dict[str, Any]], log: Sequence[dict[str, Any]] = ()) -> str:
    """``overshoot`` or ``slow``: why a run that did not learn most likely did not (see the module docstring)."""
    steps = [float(r["loss"]) for r in log if "loss" in r and not math.isnan(float(r["loss"]))]
    window = max(1, len(steps) // 10)
    smoothed = [sum(steps[i : i + window]) / window for i in range(0, len(steps) - window + 1)]
    if smoothed and max(smoothed) > OVERSHOOT * smoothed[0]:
        return "overshoot"
    losses = [float(r["loss"]) for r in history if "loss" in r and not math.isnan(float(r["loss"]))]
    if len(losses) >= 2:
        return "slow" if losses[-1] < losses[0] and losses[-1] == min(losses) else "overshoot"
    if len(smoothed) >= 2:
        return "slow" if smoothed[-1] < smoothed[0] and smoothed[-1] == min(smoothed) else "overshoot"
    return "overshoot"


def advice(
    method: str,
    learning_rate: float | None,
    default_learning_rate: float,
    trains: bool,
    cause: str = "overshoot",
    epochs: int | None = None,
) -> str:
    """The likely cause and the fix of a run that did not learn, as flags that work when pasted."""
    if not trains:  # prompting: nothing was trained, the template and the shots decide
        return (
            "likely cause: the prompt's template or shots do not lead the model to the labels; try "
            "more shots (--prompting-shots 8), --prompting-calibrate-with pool (divide out the shot pool's "
            "mean prediction) or another --prompting-template"
        )
    lr = learning_rate or default_learning_rate
    if cause == "slow":
        more = f" or --epochs {2 * epochs}" if epochs else " or more --epochs"
        return (
            f"likely cause: too few updates for {method} at learning rate {lr:.2g} (its loss was still falling "
            f"when the run ended); try --learning-rate {lr * 4:.2g}{more}"
        )
    if lr >= default_learning_rate / 2:
        return (
            f"likely cause: a learning rate too high for {method} ({lr:.2g}: the updates overshoot and the model "
            f"settles on one answer); try --learning-rate {lr / 4:.2g}"
        )
    return f"likely cause: too few updates at learning rate {lr:.2g}; try --learning-rate {lr * 4:.2g} or more --epochs"
