"""DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` with p/r the summed
log-probabilities of a response under the policy and the reference.

The reference is the same bank with every adapter off (:meth:`MultiTaskModel.disabled`): no second copy of the
model; or the policy as it starts (``initial``). Its log-probabilities never change, so they are computed once
per pair before the first update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.preference.pairs import Pair
from multitune.preference.scoring import TIE, ranked_accuracy, sequence_logps, trainable_methods
from multitune.preference.train import check_train_config, optimise

REFERENCES = {
    "disabled": "the base with every adapter off (no copy of the model)",
    "initial": "the policy as it starts, frozen (with --init-adapter: that adapter, e.g. the SFT model)",
}
REFERENCE_ALIASES = {"copy": "initial"}
REFERENCE_HELP = (
    "reference model: "
    + "; ".join(f"{k}: {v}" for k, v in REFERENCES.items())
    + "; 'copy' is accepted for initial"
)


def reference_name(name: str) -> str:
    """The reference's canonical name (an alias such as 'copy' -> 'initial'); an unknown one is a ConfigError."""
    name = REFERENCE_ALIASES.get(name, name)
    if name not in REFERENCES:
        raise ConfigError(f"reference must be one of {', '.join(REFERENCES)} (got '{name}'); fix --reference")
    return name


# ---- DPO ----------------------------------------------------------------------------------------------
def check_dpo_policy(bank: MultiTaskModel, task: str) -> TaskSpec:
    spec = bank.spec(task)
    if spec.kind != "generation":
        raise ConfigError(f"task '{task}' is a {spec.kind} task; DPO trains a generation task")
    if bank.base.arch == "encoder":
        raise ConfigError(
            f"DPO needs a causal LM or a seq2seq model; {bank.base.source} is an encoder. "
            "Use a decoder such as smollm2-135m"
        )
    return spec


def reference_logps(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    max_length: int,
    batch_size: int,
    reference: str = "disabled",
    desc: str | None = None,
) -> torch.Tensor:
    """(N, 2) log-probabilities of (chosen, rejected) under the reference, computed once, without gradients.

    ``disabled``: the base with every adapter off. ``initial`` (alias ``copy``): the task as it is now (a
    policy that starts from a fine-tuned adapter, the usual SFT-then-DPO recipe).
    """
    reference = reference_name(reference)
    prompts = [p.prompt for p in pairs]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with torch.no_grad(), bank.disabled() if reference == "disabled" else contextlib.nullcontext():
        logps = sequence_logps(bank, task, prompts + prompts, responses, max_length, batch_size, desc).float()
    return torch.stack([logps[: len(pairs)], logps[len(pairs) :]], dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean sigmoid DPO loss, per-pair reward margins beta * ((pc - rc) - (pr - rr)))."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margins).mean(), margins


def dpo_eval(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    reference: torch.Tensor,
    beta: float,
    max_length: int,
    batch_size: int,
    desc: str | None = None,
) -> dict[str, float]:
    prompts = [p.prompt for p in pairs]
    with torch.no_grad():
        logps = sequence_logps(
            bank,
            task,
            prompts + prompts,
            [p.chosen for p in pairs] + [p.rejected for p in pairs],
            max_length,
            batch_size,
            desc,
        ).float()
    ref = reference.to(logps.device)
    loss, margins = dpo_loss(logps[: len(pairs)], logps[len(pairs) :], ref[:, 0], ref[:, 1], beta)
    return {
        "accuracy": ranked_accuracy(margins, TIE * beta),
        "margin": float(margins.mean()),
        "loss": float(loss),
        "chosen_reward": float((beta * (logps[: len(pairs)] - ref[:, 0])).mean()),
        "rejected_reward": float((beta * (logps[len(pairs) :] - ref[:, 1])).mean()),
    }


def _check_dpo_run(
    bank: MultiTaskModel, task: str, pairs: Sequence[Pair], config: TrainConfig, beta: float, reference: str
) -> str:
    """Every error a DPO run can see before it starts, raised before the reference log-probabilities (a
    forward over every pair) are computed; returns the reference's canonical name."""
    if not beta > 0:
        raise ConfigError(f"beta must be > 0 (got {beta}); it scales the implicit reward, 0.1 is usual")
    reference = reference_name(reference)
    spec = check_dpo_policy(bank, task)
    check_train_config(config)
    if get_method(spec.method).fit is not None or not bank.task_parameters(task):
        raise ConfigError(
            f"method '{spec.method}' has no trainable parameters for DPO; choose one of: "
            f"{', '.join(trainable_methods())}"
        )
    if not pairs:
        raise ConfigError("no training pairs; give a file with at least one pair")
    return reference


def _dpo_batch_loss(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    ref_train: torch.Tensor,
    config: TrainConfig,
    beta: float,
) -> Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]:
    """The loop's ``batch_loss(rows)``: DPO's loss of those training pairs against their precomputed
    reference log-probabilities (rows index ``ref_train``), with the step's loss, margin and accuracy."""

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [pairs[i] for i in rows]
        prompts = [p.prompt for p in batch]
        logps = sequence_logps(
            bank,
            task,
            prompts + prompts,
            [p.chosen for p in batch] + [p.rejected for p in batch],
            config.max_length,
            2 * len(batch),
        )
        ref = ref_train[rows].to(logps.device)
        loss, margins = dpo_loss(logps[: len(batch)], logps[len(batch) :], ref[:, 0], ref[:, 1], beta)
        return loss, {
            "loss": float(loss.detach()),
            "margin": float(margins.detach().mean()),
            "accuracy": ranked_accuracy(margins.detach(), TIE * beta),
        }

    return batch_loss


def train_dpo(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    validation_pairs: Sequence[Pair],
    config: TrainConfig,
    beta: float = 0.1,
    progress: bool = True,
    reference: str = "disabled",
    run_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train generation task ``task`` with DPO's sigmoid loss against the reference (see the module doc).

    ``config.batch_size`` counts pairs. Returns ``history`` (loss, margin, reward accuracy per step),
    ``evals`` (held-out preference accuracy: the fraction of pairs whose implicit reward
    ``beta * (log pi - log ref)`` is higher for the chosen response, the mean margin, the loss), ``before``
    (at the start) and ``after`` (the weights kept). A task that owns the base weights (``full``) is its own
    reference at the start either way: the reference is computed before the first update.
    """
    reference = _check_dpo_run(bank, task, pairs, config, beta, reference)
    pairs, validation_pairs = list(pairs), list(validation_pairs)
    bank.eval()
    ref_train, ref_val = (
        reference_logps(
            bank,
            task,
            split,
            config.max_length,
            config.eval_batch_size,
            reference,
            f"reference ({name} pairs)" if progress else None,
        )
        for split, name in ((pairs, "train"), (validation_pairs, "held-out"))
    )

    def evaluate_now() -> dict[str, float] | None:
        if not validation_pairs:
            return None
        return dpo_eval(
            bank,
            task,
            validation_pairs,
            ref_val,
            beta,
            config.max_length,
            config.eval_batch_size,
            "held-out pairs" if progress else None,
        )

    result = optimise(
        bank,
        task,
        len(pairs),
        _dpo_batch_loss(bank, task, pairs, ref_train, config, beta),
        evaluate_now,
        config,
        progress,
        f"dpo {task}",
        run_dir,
        resume,
        on_step,
    )
    result.update(beta=beta, reference=reference)
    # how often the reference alone already gives the chosen response the higher likelihood (length-biased)
    result["reference_likelihood_accuracy"] = (
        ranked_accuracy(ref_val[:, 0] - ref_val[:, 1]) if validation_pairs else None
    )
    return result
