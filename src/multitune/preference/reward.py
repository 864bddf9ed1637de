"""The reward model (Ouyang et al. 2022, section 3.5): a classification task with labels ``["rejected", "chosen"]``
on an adapter over the frozen base, scored ``logit[chosen] - logit[rejected]`` and trained on the Bradley-Terry
loss ``-log sigmoid(s_chosen - s_rejected)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.preference.dpo import dpo_eval, reference_logps
from multitune.preference.pairs import Pair
from multitune.preference.scoring import check_reward_task, ranked_accuracy, reward_scores, score_rows
from multitune.preference.train import check_train_config, optimise


def reward_eval(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    max_length: int,
    batch_size: int,
    desc: str | None = None,
) -> dict[str, float]:
    prompts = [p.prompt for p in pairs]
    scores = reward_scores(
        bank,
        task,
        prompts + prompts,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        max_length,
        batch_size,
        desc,
    ).float()
    diff = scores[: len(pairs)] - scores[len(pairs) :]
    return {
        "accuracy": ranked_accuracy(diff),
        "margin": float(diff.mean()),
        "loss": float(-F.logsigmoid(diff).mean()),
    }


def pair_accuracy(
    bank: MultiTaskModel, task: str, pairs: Sequence[Pair], max_length: int = 256, batch_size: int = 16
) -> float:
    """Fraction of pairs whose chosen response scores higher (ties count half).

    A reward task compares its scores; a generation task (a DPO policy) its implicit rewards
    ``log pi(y|x) - log ref(y|x)`` against the base with adapters off (the sign does not depend on beta).
    """
    if bank.spec(task).kind == "generation":
        return dpo_eval(
            bank,
            task,
            pairs,
            reference_logps(bank, task, pairs, max_length, batch_size),
            1.0,
            max_length,
            batch_size,
        )["accuracy"]
    return reward_eval(bank, task, pairs, max_length, batch_size)["accuracy"]


# ---- reward model -------------------------------------------------------------------------------------
def train_reward(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    validation_pairs: Sequence[Pair],
    config: TrainConfig,
    progress: bool = True,
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train reward task ``task`` on Bradley-Terry ``-log sigmoid(s_chosen - s_rejected)``.

    ``config.batch_size`` counts pairs (each step reads 2 x batch_size sequences in one forward). Returns
    ``history`` (loss, margin, accuracy per step), ``evals`` (held-out pair accuracy, margin, loss per
    evaluation, the first before training), ``before``/``after`` and ``validation_accuracy`` (of the
    weights kept).
    """
    check_reward_task(bank, task)
    check_train_config(config)
    pairs, validation_pairs = list(pairs), list(validation_pairs)

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [pairs[i] for i in rows]
        prompts = [p.prompt for p in batch]
        scores = score_rows(
            bank,
            task,
            prompts + prompts,
            [p.chosen for p in batch] + [p.rejected for p in batch],
            config.max_length,
        )
        diff = scores[: len(batch)] - scores[len(batch) :]
        loss = -F.logsigmoid(diff).mean()
        return loss, {
            "loss": float(loss.detach()),
            "margin": float(diff.detach().mean()),
            "accuracy": ranked_accuracy(diff),
        }

    def evaluate_now() -> dict[str, float] | None:
        if not validation_pairs:
            return None
        return reward_eval(
            bank,
            task,
            validation_pairs,
            config.max_length,
            config.eval_batch_size,
            "held-out pairs" if progress else None,
        )

    return optimise(
        bank,
        task,
        len(pairs),
        batch_loss,
        evaluate_now,
        config,
        progress,
        f"reward {task}",
        run_dir,
        resume,
        on_step,
    )
