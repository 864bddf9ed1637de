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


LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
LOSS_NAMES = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC's hinge", "simpo": "SimPO", "orpo": "ORPO"}
REFERENCE_FREE = ("simpo", "orpo")  # no reference model: nothing is computed with the adapters off
LOSS_HELP = (
    "sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss on per-token log-ratios, target 1/(2 beta) "
    "(Azar et al. 2023); hinge: SLiC's max(0, 1 - beta h); simpo: reference-free, per-token log-probs, "
    "margin --simpo-gamma (Meng et al. 2024; its paper's beta is 2-2.5); orpo: reference-free, the chosen "
    "response's NLL + beta x the odds-ratio loss (Hong et al. 2024; beta is its lambda, 0.1)"
)


def preference_loss(
    loss: str,
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    lengths: torch.Tensor,
    beta: float,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair margins) of the DPO family; ``policy``, ``reference`` (N, 2) summed log-probs of
    (chosen, rejected), ``lengths`` (N, 2) their token counts. The margins rank a pair right when > 0
    (held-out accuracy): beta h for sigmoid and hinge, h for IPO, SimPO's beta-scaled difference
    of mean log-probs minus gamma, ORPO's log odds ratio.

    With h = (pc - rc) - (pr - rr) (summed log-probs; per token for IPO), as TRL computes them:
    sigmoid -log s(beta h); hinge max(0, 1 - beta h); ipo (h - 1/(2 beta))^2; simpo -log s(beta (pc/lc - pr/lr)
    - gamma); orpo -pc/lc + beta (-log s(log odds(pc/lc) - log odds(pr/lr))), odds(m) = e^m / (1 - e^m).
    """
    if loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)} (got '{loss}')")
    if loss in ("simpo", "orpo"):
        mean = policy / lengths  # per-token log-probabilities, <= 0
        if loss == "simpo":
            margins = beta * (mean[:, 0] - mean[:, 1]) - gamma
            return -F.logsigmoid(margins).mean(), margins
        odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))  # log(p / (1 - p)), p = e^mean
        margins = odds[:, 0] - odds[:, 1]
        return (-mean[:, 0] - beta * F.logsigmoid(margins)).mean(), margins
    assert reference is not None  # internal invariant: the losses with a reference are given one
    ratios = policy - reference
    if loss == "ipo":
        ratios = ratios / lengths
    h = ratios[:, 0] - ratios[:, 1]
    if loss == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean(), h
    margins = beta * h
    if loss == "hinge":
        return torch.relu(1 - margins).mean(), margins
    return -F.logsigmoid(margins).mean(), margins


def dpo_eval(
    bank: MultiTaskModel,
    task: str,
    pairs: Sequence[Pair],
    reference: torch.Tensor | None,
    beta: float,
    max_length: int,
    batch_size: int,
    desc: str | None = None,
    loss: str = "sigmoid",
    lengths: torch.Tensor | None = None,
    gamma: float = 0.5,
) -> dict[str, float]:
    """Held-out preference accuracy, mean margin and loss of ``loss`` (``reference`` (N, 2) or None for the
    reference-free losses; ``lengths`` (N, 2) the responses' token counts, needed by ipo, simpo, orpo)."""
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
    policy = torch.stack([logps[: len(pairs)], logps[len(pairs) :]], dim=1)
    ref = None if reference is None else reference.to(logps.device)
    counts = torch.ones_like(policy) if lengths is None else lengths.to(logps.device)
    value, margins = preference_loss(loss, policy, ref, counts, beta, gamma)
    rewards = beta * (policy - ref) if ref is not None else beta * policy / counts  # the implicit rewards
    return {
        "accuracy": ranked_accuracy(margins, TIE * beta),
        "margin": float(margins.mean()),
        "loss": float(value),
        "chosen_reward": float(rewards[:, 0].mean()),
        "rejected_reward": float(rewards[:, 1].mean()),
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
    ref_train: torch.Tensor | None,
    config: TrainConfig,
    beta: float,
    loss: str = "sigmoid",
    lengths: torch.Tensor | None = None,
    gamma: float = 0.5,
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
        policy = torch.stack([logps[: len(batch)], logps[len(batch) :]], dim=1)
        ref = None if ref_train is None else ref_train[rows].to(logps.device)
        counts = torch.ones_like(policy) if lengths is None else lengths[rows].to(logps.device)
        value, margins = preference_loss(loss, policy, ref, counts, beta, gamma)
        return value, {
            "loss": float(value.detach()),
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
    loss: str = "sigmoid",
    gamma: float = 0.5,
) -> dict[str, Any]:
    """Train generation task ``task`` with a loss of the DPO family (:func:`preference_loss`; sigmoid: DPO
    against the reference, see the module doc; simpo and orpo need no reference).

    ``config.batch_size`` counts pairs. Returns ``history`` (loss, margin, reward accuracy per step),
    ``evals`` (held-out preference accuracy: the fraction of pairs whose implicit reward
    ``beta * (log pi - log ref)`` is higher for the chosen response, the mean margin, the loss), ``before``
    (at the start) and ``after`` (the weights kept). A task that owns the base weights (``full``) is its own
    reference at the start either way: the reference is computed before the first update.
    """
    reference = _check_dpo_run(bank, task, pairs, config, beta, reference)
    if loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)} (got '{loss}')")
    pairs, validation_pairs = list(pairs), list(validation_pairs)
    bank.eval()
    ref_train: torch.Tensor | None = None
    ref_val: torch.Tensor | None = None
    if loss not in REFERENCE_FREE:
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
    len_train, len_val = (
        _lengths(bank, task, split, config.max_length) for split in (pairs, validation_pairs)
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
            loss,
            len_val,
            gamma,
        )

    result = optimise(
        bank,
        task,
        len(pairs),
        _dpo_batch_loss(bank, task, pairs, ref_train, config, beta, loss, len_train, gamma),
        evaluate_now,
        config,
        progress,
        f"dpo {task}",
        run_dir,
        resume,
        on_step,
    )
    result.update(beta=beta, reference=None if loss in REFERENCE_FREE else reference, loss=loss)
    if loss == "simpo":
        result["gamma"] = gamma
    # how often the reference alone already gives the chosen response the higher likelihood (length-biased)
    result["reference_likelihood_accuracy"] = (
        ranked_accuracy(ref_val[:, 0] - ref_val[:, 1]) if validation_pairs and ref_val is not None else None
    )
    return result


def _lengths(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], max_length: int) -> torch.Tensor:
    """(N, 2) token counts of (chosen, rejected) as the log-probabilities sum them."""
    from multitune.preference.scoring import response_tokens

    prompts = [p.prompt for p in pairs]
    counts = response_tokens(
        bank, task, prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], max_length
    )
    return torch.stack([counts[: len(pairs)], counts[len(pairs) :]], dim=1)
