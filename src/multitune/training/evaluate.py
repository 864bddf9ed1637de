"""Prediction and evaluation of one task of a bank, in batches, without gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.metrics import classification_metrics, generation_metrics, perplexity


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def autocast(bank: MultiTaskModel) -> Any:
    device = bank.base.device
    enabled = device.type == "cuda" and bank.base.model.dtype == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict_proba(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int = 128, batch_size: int = 64
) -> torch.Tensor:
    """Class probabilities (N, C) of a classification task, columns in ``spec.labels`` order."""
    spec = bank.tasks[task]
    slot = bank.slots.index(task)
    pad = bank.base.tokenizer.pad_token_id
    was_training = bank.training
    bank.eval()
    out = []
    for chunk in _batches(examples, batch_size):
        features = encode_task(bank, task, chunk, max_length)
        batch = to_device(collate(features, pad, slot), bank.base.device)
        with autocast(bank):
            logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        out.append(torch.softmax(logits[:, : len(spec.labels)].float(), dim=-1).cpu())
    bank.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(spec.labels))


def predict_labels(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int = 128, batch_size: int = 64
) -> list[str]:
    labels = bank.tasks[task].labels
    probs = predict_proba(bank, task, examples, max_length, batch_size)
    return [labels[i] for i in probs.argmax(dim=-1).tolist()]


@torch.no_grad()
def generate_texts(
    bank: MultiTaskModel,
    task: str,
    examples: Sequence[Example],
    max_length: int = 128,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy (by default) completions of each example's prompt."""
    slot = bank.slots.index(task)
    tokenizer = bank.base.tokenizer
    was_training = bank.training
    bank.eval()
    texts: list[str] = []
    generate_kwargs.setdefault("do_sample", False)
    for chunk in _batches(examples, batch_size):
        features = encode_task(bank, task, chunk, max_length, with_target=False)
        side = "left" if bank.base.arch == "decoder" else "right"
        batch = to_device(
            collate(features, tokenizer.pad_token_id, slot, padding_side=side), bank.base.device
        )
        with autocast(bank):
            out = bank.generate(
                batch["input_ids"],
                batch["attention_mask"],
                batch["task_ids"],
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        texts += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    bank.train(was_training)
    return texts


@torch.no_grad()
def lm_nll(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int = 128, batch_size: int = 16
) -> tuple[float, int]:
    """Summed NLL and token count of the responses given their prompts."""
    slot = bank.slots.index(task)
    was_training = bank.training
    bank.eval()
    total, count = 0.0, 0
    for chunk in _batches(examples, batch_size):
        features = encode_task(bank, task, chunk, max_length)
        batch = to_device(collate(features, bank.base.tokenizer.pad_token_id, slot), bank.base.device)
        with autocast(bank):
            nll, n = bank.lm_loss(batch)
        total, count = total + float(nll), count + int(n)
    bank.train(was_training)
    return total, count


def scores_of_probabilities(
    probs: torch.Tensor, examples: Sequence[Example], labels: Sequence[str]
) -> tuple[dict[str, float], list[str]]:
    """(accuracy, macro-F1 and loss of label probabilities (n, C) against the examples' labels, the predictions)."""
    predictions = [labels[i] for i in probs.argmax(dim=-1).tolist()]
    references = [ex.label or "" for ex in examples]
    gold = torch.tensor([labels.index(r) if r in labels else 0 for r in references])
    nll = -torch.log(probs[torch.arange(len(gold)), gold].clamp(min=1e-12)).mean()
    return {**classification_metrics(predictions, references, labels), "loss": float(nll)}, predictions


def evaluate(
    bank: MultiTaskModel,
    task: str,
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    generate: bool = True,
    spread: bool = False,
) -> dict[str, float]:
    """The task's metrics on labelled examples: accuracy and macro-F1, or loss, perplexity, EM and ROUGE-L (a
    domain task: the loss and perplexity of its objective on raw text, :func:`multitune.domain.scores`).

    ``generate=False`` skips the (slow) generation metrics: what early stopping uses for generation tasks.
    ``spread``: classification scores also count the distinct labels predicted (``predicted_labels``: 1 is a
    run that answers one label for everything, see :mod:`multitune.training.learned`).
    """
    spec: TaskSpec = bank.tasks[task]
    if not examples:
        return {}
    if spec.kind == "domain":  # held-out loss (and perplexity) of its self-supervised objective
        from multitune.domain import scores as domain_scores

        return domain_scores(bank, task, examples, max_length, batch_size)
    if spec.kind == "classification":
        probs = predict_proba(bank, task, examples, max_length, batch_size)
        scores, predictions = scores_of_probabilities(probs, examples, spec.labels)
        return {**scores, "predicted_labels": float(len(set(predictions)))} if spread else scores
    total, count = lm_nll(bank, task, examples, max_length, max(1, batch_size // 4))
    metrics = {"loss": total / max(count, 1), "perplexity": perplexity(total, count)}
    if generate:
        texts = generate_texts(bank, task, examples, max_length, max_new_tokens, max(1, batch_size // 4))
        metrics.update(generation_metrics(texts, [ex.response or "" for ex in examples]))
    return {k: (v if not math.isnan(v) else float("nan")) for k, v in metrics.items()}
