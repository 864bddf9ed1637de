"""Memorisation: the loss-based membership-inference attack on a trained task (``multitune audit --membership``).

The attack of Yeom et al. 2018 (section 3.2, "the loss attack"): a row is guessed to be a training row (member)
when the task's loss on it is low. Its strength is measured threshold-free:

- **ROC AUC** of the score "lower loss => member", by the Mann-Whitney rank formula (ties counted half):
  :math:`\\mathrm{AUC} = \\frac{1}{mn}\\sum_{i \\in M}\\sum_{j \\in N}\\big([l_i < l_j] + \\tfrac12 [l_i = l_j]\\big)`,
  the chance that a random member has a lower loss than a random non-member. 0.5 is no leak.
  The 95% interval is the percentile bootstrap (:func:`multitune.metrics.bootstrap_interval`) over the members of
  each member's share :math:`s_i = \\frac1n\\sum_j([l_i<l_j]+\\frac12[l_i=l_j])`, whose mean is the AUC: an interval
  conditional on the non-member rows.
- **Balanced attack advantage** (Yeom et al., definition 4): :math:`\\max_t \\mathrm{TPR}(t) - \\mathrm{FPR}(t)` over
  every threshold ``t`` of "member when loss <= t", on equal priors.

A row's loss is the task's own: ``-log p(label)`` for classification, the negative summed log-probability of the
response for generation (:func:`multitune.preference.scoring.sequence_logps`). The members are the training rows
the run kept in ``data/replay.jsonl`` (all of them up to 500, :mod:`multitune.health.kept`), the non-members its
test split in ``data/test.jsonl``, rows the training never saw; ``--members``/``--non-members`` give other files.

Written here (a dozen lines) because sklearn is no dependency of multitune.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitune.data import Columns, Example, load_inputs, task_kind
from multitune.errors import ConfigError, DataError
from multitune.metrics import bootstrap_interval


def member_shares(members: Sequence[float], non_members: Sequence[float]) -> np.ndarray:
    """(M,) each member's share of non-members with a higher loss (ties half): their mean is the AUC."""
    non = np.sort(np.asarray(non_members, dtype=np.float64))
    losses = np.asarray(members, dtype=np.float64)
    below = np.searchsorted(non, losses, side="left")  # non-members with a lower loss
    not_above = np.searchsorted(non, losses, side="right")  # ... lower or equal
    higher = len(non) - not_above
    return (higher + 0.5 * (not_above - below)) / len(non)


def membership_auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """ROC AUC of "lower loss => member" (Mann-Whitney, ties half)."""
    if not len(members) or not len(non_members):
        raise DataError("the membership attack needs at least one member and one non-member row")
    return float(member_shares(members, non_members).mean())


def attack_advantage(members: Sequence[float], non_members: Sequence[float]) -> float:
    """max over thresholds t of TPR - FPR for "member when loss <= t" (0 when no threshold beats chance)."""
    m = np.sort(np.asarray(members, dtype=np.float64))
    n = np.sort(np.asarray(non_members, dtype=np.float64))
    thresholds = np.unique(np.concatenate([m, n]))
    tpr = np.searchsorted(m, thresholds, side="right") / len(m)
    fpr = np.searchsorted(n, thresholds, side="right") / len(n)
    return float(max(0.0, (tpr - fpr).max()))


def membership_report(
    members: Sequence[float], non_members: Sequence[float], resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The ``membership`` section of ``audit.json`` from the two sides' per-row losses."""
    auc = membership_auc(members, non_members)
    low, high = bootstrap_interval(member_shares(members, non_members).tolist(), resamples, seed=seed)
    return {
        "attack": "loss (Yeom et al. 2018)",
        "auc": auc,
        "auc_ci": [low, high],
        "advantage": attack_advantage(members, non_members),
        "members": len(members),
        "non_members": len(non_members),
        "mean_loss_members": float(np.mean(members)),
        "mean_loss_non_members": float(np.mean(non_members)),
    }


def losses(task: Any, examples: Sequence[Example], batch_size: int = 64) -> list[float]:
    """Each row's loss under the task: -log p(label), or the response's negative summed log-probability."""
    if task.spec.kind == "generation":
        from multitune.preference.scoring import sequence_logps

        if any(e.response is None for e in examples):
            raise DataError(
                "the membership rows of a generation task need responses: pass --response-column NAME"
            )
        with torch.no_grad():
            logps = sequence_logps(
                task.bank, task.task, [e.text for e in examples], [e.response or "" for e in examples],
                task.max_length, max(1, batch_size // 4),
            )  # fmt: skip
        return (-logps.float().cpu()).tolist()
    index = {label: i for i, label in enumerate(task.labels)}
    unknown = sorted({str(e.label) for e in examples if e.label not in index})
    if unknown:
        raise DataError(
            f"membership rows have labels the task does not know ({', '.join(unknown[:5])}) or none; "
            f"its labels are {', '.join(task.labels)}: pass --label-column NAME"
        )
    probs = task.predict_proba(list(examples), batch_size)
    picked = probs[torch.arange(len(examples)), torch.tensor([index[str(e.label)] for e in examples])]
    return (-picked.clamp_min(1e-12).log()).tolist()


def membership_rows(
    run: str | Path, kind: str, members: str | None, non_members: str | None, columns: Columns | None
) -> tuple[list[Example], list[Example]]:
    """The member and non-member rows: the files given, else the training sample and test split the run kept."""
    from multitune.health.kept import REPLAY_FILE, TEST_FILE, read_examples
    from multitune.health.versions import DATA

    out = []
    for given, name, what in ((members, REPLAY_FILE, "--members"), (non_members, TEST_FILE, "--non-members")):
        if given is not None:
            out.append(load_inputs(given, task_kind(kind), columns or Columns())[1])
            continue
        kept = Path(run) / DATA / name
        if not kept.exists():
            raise ConfigError(
                f"{kept} not found: the run kept no rows (trained with --no-keep-replay, or RUN is an adapter "
                f"folder); give {what} FILE"
            )
        out.append(read_examples(kept))
    if not out[0] or not out[1]:
        raise DataError("the membership attack needs at least one member and one non-member row")
    return out[0], out[1]


def run_membership(
    task: Any,
    run: str | Path,
    members: str | None = None,
    non_members: str | None = None,
    columns: Columns | None = None,
    resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The membership attack on a loaded task (:class:`multitune.api.Task`) of run folder ``run``."""
    inside, outside = membership_rows(run, task.spec.kind, members, non_members, columns)
    return membership_report(
        losses(task, inside, batch_size), losses(task, outside, batch_size), resamples, seed
    )


def membership_line(result: dict[str, Any]) -> str:
    low, high = result["auc_ci"]
    return (
        f"membership (loss attack): AUC {result['auc']:.3f} [{low:.3f}, {high:.3f}], advantage "
        f"{result['advantage']:.3f} ({result['members']} training rows vs {result['non_members']} held-out; "
        "0.5 is no leak)"
    )
