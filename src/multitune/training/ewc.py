"""Elastic weight consolidation: update a task on new data without forgetting what it knew.

EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", eq. 3) keeps each
parameter near the value it had after the old training, in proportion to how much the old data's loss
depends on it. With theta* the task's parameters before the update (the *anchor*) and F the diagonal of the
Fisher information on the old data, the update minimises::

    L_new(theta) + lambda / 2 * sum_i Fhat_i * (theta_i - theta*_i)^2,      Fhat = F / mean(F)

:func:`fisher_diagonal` estimates F as the *empirical* Fisher, the mean over the old examples of each
per-example gradient squared, F_i = 1/N sum_n (d loss_n / d theta_i)^2, where loss_n is the example's
cross-entropy (classification) or its mean target-token NLL (generation). Gradients are per example, not of
a batch's mean (Avalanche squares the batch gradient, which shrinks F by up to the batch size and mixes
examples' signs). :func:`ewc_penalty` gives the second term as a closure for ``train(..., penalty=...)``.

Why Fhat = F / mean(F) and the default strength: the raw F of a task that fits its data is tiny (confident
examples have small gradients) and its scale changes with the model, the method and the loss, so a fixed
lambda on the raw F is a no-op on one task and a freeze on another. Dividing by the mean over the task's
kept entries makes Fhat dimensionless (an average parameter weighs 1), as normalised EWC variants do, and
keeps the ratios between parameters that the Fisher measures. Under AdamW the penalty's pull on parameter i,
lambda * Fhat_i * (theta_i - theta*_i), is set against that parameter's new-data gradient (AdamW rescales
their sum per coordinate, not each alone): a parameter stops drifting where lambda * Fhat_i * |delta_i| meets
|g_i|. The default :data:`DEFAULT_STRENGTH` (100) was chosen on the tiny random models (a two-label LoRA task grown by
a third label and updated on the new label's rows alone, at LoRA's default learning rate; the figures are in the
constant's comment). It is a starting point for real models, not an optimum measured on them: larger keeps more
of the old task, smaller learns the new data faster.

A grown head (:meth:`multitune.bank.MultiTaskModel.grow_labels`) is anchored on its old rows only: the anchor
and the Fisher have K rows, the head K + n; the new rows are free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from multitune.bank import MultiTaskModel
from multitune.data import Example
from multitune.encode import IGNORE, collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.training.evaluate import autocast

# lambda, on Fhat = F / mean(F). Measured on the tiny random models (rank-4 LoRA, a neg/pos task grown by a
# question label, updated 5 epochs on the new label's 48 rows at LoRA's default 2e-3; old / new accuracy on held-
# out rows, lambda 0 -> 100 -> 1000): BERT 0.00/1.00 -> 0.31/0.91 -> 0.59/0.56, GPT-2 0.00/0.97 -> 0.44/0.72
# -> 0.53/0.63, Llama 0.13/0.84 -> 0.38/0.56 -> 0.41/0.44. Below 30 the penalty barely holds the old labels;
# from 1000 the new label is hardly learnt. 100 keeps part of the old task and still learns the new one. Class-
# incremental updates without old rows are where EWC is known to be weakest (van de Ven et al. 2019): over 15
# epochs BERT's new label wins at every lambda (old 0.03 at 100), which replay is for; the update's gate measures.
DEFAULT_STRENGTH = 100.0


def row_losses(bank: MultiTaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's own loss (B,): its cross-entropy, or its mean NLL over its target tokens."""
    if "class_labels" in batch:
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        return F.cross_entropy(logits.float(), batch["class_labels"], reduction="none")
    logits, labels = bank.target_logits(batch)  # (B, T, V), (B, T)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)


def fisher_diagonal(
    bank: MultiTaskModel,
    task: str,
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal of ``task`` on ``examples``: per key of ``bank.task_parameters(task)``, the
    mean over examples of the squared per-example gradient (float32, on the parameter's device).

    The bank runs in eval mode (no dropout); one forward per batch of ``batch_size`` rows, then one backward per
    row (``torch.autograd.grad``: no ``.grad`` is written, no other parameter gets a gradient). A task without
    parameters (prompting) gives {}.
    """
    params = bank.task_parameters(task)
    if not params:
        return {}
    features = encode_task(bank, task, examples, max_length)
    if not features:
        raise ConfigError(f"the Fisher of task '{task}' needs examples of what it learnt; give some old data")
    if bank.tasks[task].kind == "classification" and any("class_label" not in f for f in features):
        raise ConfigError(
            f"some examples for the Fisher of task '{task}' have labels outside its label set "
            f"{bank.tasks[task].labels[:10]}; compute the Fisher on the task's old data before growing it"
        )
    keys, tensors = list(params), list(params.values())
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    slot, pad = bank.slots.index(task), bank.base.tokenizer.pad_token_id
    was_training = bank.training
    bank.eval()
    try:
        with torch.enable_grad():
            for start in range(0, len(features), batch_size):
                batch = to_device(collate(features[start : start + batch_size], pad, slot), bank.base.device)
                with autocast(bank):
                    losses = row_losses(bank, batch)
                for i, row in enumerate(losses):
                    grads = torch.autograd.grad(
                        row, tensors, retain_graph=i < len(losses) - 1, allow_unused=True
                    )
                    for total, grad in zip(fisher, grads, strict=True):
                        if grad is not None:
                            total.add_(grad.detach().float().pow(2))
    finally:
        bank.train(was_training)
    return {key: total / len(features) for key, total in zip(keys, fisher, strict=True)}


def _old_part(key: str, tensor: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """``tensor`` cut to ``shape`` along its first dimension (a grown head's old rows); other shapes refused."""
    if tensor.shape == shape:
        return tensor
    if tensor.dim() == len(shape) and tensor.shape[1:] == shape[1:] and tensor.shape[0] >= shape[0]:
        return tensor[: shape[0]]
    raise ConfigError(
        f"the {what} of '{key}' has shape {tuple(tensor.shape)} but the anchor {tuple(shape)}; compute the "
        "anchor and the Fisher on the same task before its update"
    )


def ewc_penalty(
    bank: MultiTaskModel,
    task: str,
    anchor: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    strength: float = DEFAULT_STRENGTH,
) -> Callable[[], torch.Tensor]:
    """A closure giving ``strength / 2 * sum_i Fhat_i (theta_i - anchor_i)^2`` over the keys of the task that
    ``anchor`` and ``fisher`` both have, Fhat = fisher / its mean over those entries (the module docstring says
    why); a grown head's new rows are free. The current parameters are read at each call (a float32 scalar
    with its graph, on the task's device); with no such keys it is a constant 0.

    ``anchor``: the task's tensors before the update (``bank.task_state_dict(task)``); ``fisher``:
    :func:`fisher_diagonal` of the same weights on the old data.
    """
    if not strength >= 0:
        raise ConfigError(
            f"the EWC strength must be 0 or more (got {strength}); the default is {DEFAULT_STRENGTH}"
        )
    params = bank.task_parameters(task)
    keys = [k for k in params if k in anchor and k in fisher]
    if not keys and set(anchor) & set(fisher):
        raise ConfigError(
            f"the anchor and the Fisher hold none of the parameters of task '{task}'; were they computed for "
            "another task or method?"
        )
    device = next(iter(params.values())).device if params else bank.base.device
    anchors = {k: anchor[k].detach().to(device, torch.float32) for k in keys}
    for k in keys:
        _old_part(k, params[k], anchors[k].shape, "parameter")
    weights = {
        k: _old_part(k, fisher[k], anchors[k].shape, "Fisher").detach().to(device, torch.float32)
        for k in keys
    }
    mean = torch.cat([w.flatten() for w in weights.values()]).mean() if keys else torch.zeros(())
    scale = 0.0 if float(mean) <= 0 else strength / float(mean)
    weights = {k: w * scale for k, w in weights.items()}

    def penalty() -> torch.Tensor:
        total = torch.zeros((), device=device)
        current = bank.task_parameters(task)
        for k in keys:
            theta = current[k][: anchors[k].shape[0]] if anchors[k].dim() else current[k]
            total = total + (weights[k] * (theta.float() - anchors[k]).pow(2)).sum()
        return 0.5 * total

    return penalty
