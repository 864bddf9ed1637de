"""The one training loop (:func:`multitune.training.loop.fit`) for preference objectives: in eval mode (dropout
off, as TRL does by default: with dropout the policy differs from the reference before any update and the two
scores of a pair carry independent noise), the starting weights a candidate, the best held-out pair accuracy
(then the lower loss) kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.preference.scoring import trainable_methods
from multitune.training.loop import Objective, Shuffled, fit


def check_train_config(config: TrainConfig) -> None:
    problems = [
        f"{name} must be >= 1 (got {getattr(config, name)})"
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_length", "patience")
        if getattr(config, name) < 1
    ]
    if config.learning_rate is not None and config.learning_rate <= 0:
        problems.append(f"learning_rate must be > 0 (got {config.learning_rate})")
    if config.scheduler not in ("linear", "cosine", "constant"):
        problems.append(f"scheduler must be linear, cosine or constant (got '{config.scheduler}')")
    if problems:
        raise ConfigError("; ".join(problems))


def optimise(
    bank: MultiTaskModel,
    task: str,
    n: int,
    batch_loss: Callable[[list[int]], tuple[torch.Tensor, dict]],
    evaluate_now: Callable[[], dict[str, float] | None],
    config: TrainConfig,
    progress: bool,
    desc: str,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The one training loop (:func:`multitune.training.loop.fit`) over ``n`` training pairs, in eval mode.

    ``batch_loss(rows)`` gives the mean loss of those pairs and its statistics; ``evaluate_now()`` the
    held-out record (accuracy, margin, loss) or None without held-out pairs. The weights before the first
    step are a candidate too: training that only makes things worse returns the task unchanged. The best
    evaluation (accuracy, then lower loss) is restored at the end; a method that folds is scored again after.
    """
    check_train_config(config)
    spec = bank.spec(task)
    if not bank.task_parameters(task):
        raise ConfigError(
            f"task '{task}' ({spec.method}) has no trainable parameters; choose one of: "
            f"{', '.join(trainable_methods())}"
        )
    if n < 1:
        raise ConfigError("no training pairs; give a file with at least one pair")
    lr = config.learning_rate or get_method(spec.method).default_learning_rate
    objective = Objective(
        [task],
        [lr],
        Shuffled(n, config.batch_size, config.seed),
        batch_loss,
        lambda _: evaluate_now(),
        {task: "accuracy"},
        key=lambda _, scores: (scores["accuracy"], -scores["loss"]),
    )
    result = fit(
        bank,
        objective,
        config,
        run_dir,
        resume,
        progress,
        desc,
        score_start=True,
        train_mode=False,
        on_step=on_step,
    )[task]
    evals = result.history
    after = next((e for e in evals if e["step"] == result.best_step), None)
    if get_method(spec.method).fold is not None:  # what is saved is the folded task: score it
        with torch.no_grad():
            scores = evaluate_now()
        if after is not None and scores is not None:
            after = {**after, **scores}
    return {
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 2),
        "learning_rate": lr,
        "history": result.log,
        "evals": evals,
        "before": evals[0] if evals else None,
        "after": after,
        "validation_accuracy": after["accuracy"] if after else None,
    }
