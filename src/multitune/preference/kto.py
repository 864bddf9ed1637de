"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8): preference
tuning from unpaired examples, each one completion marked desirable or not (a thumbs up or down), which is what
a served task's ratings are (``multitune feedback export --preferences``: TRL's unpaired format
``{"prompt", "completion", "label": true|false}``).

With r = log pi(y|x) - log ref(y|x) (summed log-probabilities; the reference is the bank with its adapters off, as
for DPO) and z0 the reference point, an estimate of KL(pi || ref) from mismatched pairs::

    desirable:    lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable:  lambda_U (1 - sigmoid(beta (z0 - r)))

z0 is TRL's estimate: the mean of r over the batch's prompts each paired with another row's completion (row i's
prompt with row i+1's completion), clamped at 0 and detached (no gradient flows through the reference point).
The held-out score is the share of examples on the right side of z0 (desirable: r > z0), the KTO counterpart
of DPO's preference accuracy. We wrote this loss ourselves as the DPO family's: TRL's KTOTrainer needs its own
model and data collator, not a bank's routed task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig, plural
from multitune.errors import ConfigError, DataError
from multitune.methods import get_method
from multitune.preference.dpo import check_dpo_policy, reference_name
from multitune.preference.pairs import _line_numbers, _text
from multitune.preference.scoring import sequence_logps, trainable_methods
from multitune.preference.train import check_train_config, optimise
from multitune.tables import read_table

TRUE, FALSE = ("true", "1", "yes", "good", "desirable"), ("false", "0", "no", "bad", "undesirable")


@dataclass(frozen=True)
class Unpaired:
    """One completion of a prompt, desirable or not."""

    prompt: str
    completion: str
    desirable: bool


def _label(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise DataError(f"{where}: 'label' is {str(value)[:20]!r}; give true or false (desirable or not)")


def load_unpaired(path: str | Path, drop_empty: bool = False) -> list[Unpaired]:
    """KTO rows from a .jsonl/.json/.csv/.tsv/.parquet file: ``prompt``, ``completion`` (or ``response``) and
    ``label`` true/false. Errors name the row and the fix."""
    path = Path(path)
    rows = read_table(path)
    unit, numbers = _line_numbers(path, len(rows))
    out: list[Unpaired] = []
    for row, number in zip(rows, numbers, strict=True):
        where = f"{unit} {number} of {path}"
        text = "completion" if "completion" in row else "response"
        absent = [k for k in ("prompt", text, "label") if k not in row]
        if absent:
            raise DataError(
                f"{where} lacks {', '.join(repr(k) for k in absent)}; KTO rows need prompt, completion and "
                "label (true/false), as 'multitune feedback export --preferences' writes them"
            )
        completion = _text(row[text], where, text)
        if not completion.strip():
            if drop_empty:
                continue
            raise DataError(f"{where}: the completion is empty; remove the row or pass --drop-empty")
        out.append(Unpaired(_text(row["prompt"], where, "prompt"), completion, _label(row["label"], where)))
    if not out:
        raise DataError(f"{path} has no KTO rows; give rows with prompt, completion and label")
    return out


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy: torch.Tensor,
    kl_reference: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, per-row margins beta (r - z0) signed so that > 0 is right, z0) of the module docstring's
    loss; ``policy``, ``reference`` (N,) summed log-probs of the rows, ``kl_*`` (M,) of the mismatched pairs."""
    z0 = (kl_policy - kl_reference).mean().clamp(min=0).detach()
    rewards = policy - reference
    sign = torch.where(desirable, 1.0, -1.0).to(rewards.dtype)
    margins = beta * (rewards - z0) * sign
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(rewards.dtype)
    return (weights * (1 - torch.sigmoid(margins))).mean(), margins, z0


def _mismatched(rows: Sequence[Unpaired]) -> tuple[list[str], list[str]]:
    """Row i's prompt with row i+1's completion (the last with the first): the pairs z0 is estimated on."""
    prompts = [r.prompt for r in rows]
    completions = [r.completion for r in rows]
    return prompts, completions[1:] + completions[:1]


def _logps(
    bank: MultiTaskModel,
    task: str,
    rows: Sequence[Unpaired],
    config: TrainConfig,
    batch_size: int,
    reference: str | None = None,
    pairs: bool = True,
) -> torch.Tensor:
    """(N, 2) summed log-probs of each row's completion and of its mismatched pair (``pairs`` False: (N, 1), the
    mismatched pairs alone), under the policy, or with ``reference`` under the reference without gradients."""
    import contextlib

    prompts, others = _mismatched(rows)
    texts, completions = ([r.prompt for r in rows], [r.completion for r in rows]) if pairs else ([], [])
    texts, completions = texts + prompts, completions + others
    if reference is None:
        logps = sequence_logps(bank, task, texts, completions, config.max_length, batch_size)
    else:
        off = bank.disabled() if reference == "disabled" else contextlib.nullcontext()
        with torch.no_grad(), off:
            logps = sequence_logps(bank, task, texts, completions, config.max_length, batch_size).float()
    return logps.view(-1, 1) if not pairs else torch.stack([logps[: len(rows)], logps[len(rows) :]], dim=1)


def train_kto(
    bank: MultiTaskModel,
    task: str,
    rows: Sequence[Unpaired],
    validation: Sequence[Unpaired],
    config: TrainConfig,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    progress: bool = True,
    reference: str = "disabled",
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train generation task ``task`` with KTO on ``rows``; early stopping on ``validation``'s score (the share
    of examples on the right side of z0). Returns the loop's result with ``beta``, the weights and the counts."""
    if not beta > 0:
        raise ConfigError(f"--beta must be > 0 (got {beta}); 0.1 is usual")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ConfigError("--desirable-weight and --undesirable-weight must be > 0")
    reference = reference_name(reference)
    spec = check_dpo_policy(bank, task)
    check_train_config(config)
    if get_method(spec.method).fit is not None or not bank.task_parameters(task):
        raise ConfigError(
            f"method '{spec.method}' has no trainable parameters for KTO; choose one of: "
            f"{', '.join(trainable_methods())}"
        )
    if len(rows) < 2:
        raise ConfigError(
            f"KTO needs at least 2 training rows (its reference point pairs each prompt with another row's "
            f"completion); got {plural(len(rows), 'row')}"
        )
    rows, validation = list(rows), list(validation)
    bank.eval()
    size = config.eval_batch_size
    ref_train = _logps(bank, task, rows, config, size, reference)
    ref_val = _logps(bank, task, validation, config, size, reference) if len(validation) > 1 else None
    good = torch.tensor([r.desirable for r in rows])
    good_val = torch.tensor([r.desirable for r in validation])

    def batch_loss(picked: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [rows[i] for i in picked]
        if len(batch) < 2:  # one row has no other completion to estimate z0 from: the neighbour in the data
            picked = [*picked, (picked[0] + 1) % len(rows)]
            batch = [rows[i] for i in picked]
        policy = _logps(bank, task, batch, config, 2 * len(batch))
        # each row's reference log-prob is precomputed; its in-batch mismatched pair is this batch's own
        mismatched = _logps(bank, task, batch, config, config.eval_batch_size, reference, pairs=False)
        ref = torch.cat([ref_train[picked].to(mismatched.device)[:, :1], mismatched], dim=1)
        value, margins, _ = kto_loss(
            policy[:, 0], ref[:, 0], good[picked].to(policy.device), policy[:, 1], ref[:, 1], beta,
            desirable_weight, undesirable_weight,
        )  # fmt: skip
        return value, {
            "loss": float(value.detach()),
            "accuracy": float((margins.detach() > 0).float().mean()),
        }

    def evaluate_now() -> dict[str, float] | None:
        if ref_val is None:
            return None
        with torch.no_grad():
            policy = _logps(bank, task, validation, config, config.eval_batch_size).float()
        value, margins, z0 = kto_loss(
            policy[:, 0], ref_val[:, 0].to(policy.device), good_val.to(policy.device), policy[:, 1],
            ref_val[:, 1].to(policy.device), beta, desirable_weight, undesirable_weight,
        )  # fmt: skip
        return {
            "accuracy": float((margins > 0).float().mean()),
            "margin": float(margins.mean()),
            "loss": float(value),
            "z0": float(z0),
        }

    result = optimise(
        bank, task, len(rows), batch_loss, evaluate_now, config, progress, f"kto {task}", run_dir, resume
    )
    result.update(
        beta=beta,
        reference=reference,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        rows={"desirable": int(good.sum()), "undesirable": int((~good).sum())},
    )
    return result
