"""Prompt ensembling (Lester et al. 2021, section 6): N soft prompts of one task, one batch, majority vote.

The members are ordinary prompt-tuned tasks of one bank (``{task}-e0``, ``{task}-e1``, ...) trained from
different seeds. Because the bank routes every row to its own prompt, evaluating the ensemble costs one
batch of N x B rows through one frozen model, not N models: the point of the paper's section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.encode import collate, encode_example, to_device
from multitune.errors import ConfigError
from multitune.methods.prompt import PromptConfig
from multitune.metrics import classification_metrics
from multitune.train import train


def member_names(task: str, n: int) -> list[str]:
    return [f"{task}-e{i}" for i in range(n)]


def train_prompt_ensemble(bank: MultiTaskModel, task: str, n: int, labels: list[str],
                          train_examples: Sequence[Example], validation_examples: Sequence[Example],
                          config: TrainConfig, prompt: PromptConfig | None = None,
                          progress: bool = False) -> list[str]:
    """Add and train ``n`` prompt-tuned members of a classification task, member i with seed ``seed + i``."""
    if n < 1:
        raise ConfigError(f"an ensemble needs at least 1 member (got {n})")
    members = member_names(task, n)
    for i, member in enumerate(members):
        torch.manual_seed(config.seed + i)  # the prompt's initialisation
        bank.add_task(member, "classification", "prompt", prompt or PromptConfig(), labels)
        train(bank, member, train_examples, validation_examples, dataclasses.replace(config, seed=config.seed + i),
              progress=progress)
    return members


def _check(bank: MultiTaskModel, members: Sequence[str]) -> list[str]:
    if not members:
        raise ConfigError("an ensemble needs at least one member task")
    labels = None
    for member in members:
        spec = bank.tasks.get(member)
        if spec is None:
            raise ConfigError(f"unknown ensemble member '{member}'; tasks in this bank: {', '.join(bank.tasks) or 'none'}")
        if spec.kind != "classification":
            raise ConfigError(f"ensemble member '{member}' is a {spec.kind} task; majority vote needs classification")
        if labels is not None and spec.labels != labels:
            raise ConfigError(f"ensemble member '{member}' has labels {spec.labels[:5]}, not {labels[:5]}: "
                              "members must be trained on the same task")
        labels = spec.labels
    return list(labels or [])


@torch.no_grad()
def ensemble_votes(bank: MultiTaskModel, members: Sequence[str], examples: Sequence[Example],
                   max_length: int = 128, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's predicted class (E, N) and probabilities (E, N, C), every example's N rows in one batch."""
    labels = _check(bank, members)
    spec = bank.tasks[members[0]]
    slots = [bank.slots.index(m) for m in members]
    pad = bank.base.tokenizer.pad_token_id
    was_training = bank.training
    bank.eval()
    per_batch = max(1, batch_size // len(members))
    probs = []
    for start in range(0, len(examples), per_batch):
        chunk = examples[start : start + per_batch]
        features = [encode_example(bank.base, spec, ex, max_length) for ex in chunk]
        repeated = [f for f in features for _ in members]  # example-major: rows e*N .. e*N + N-1
        batch = to_device(collate(repeated, pad, slots * len(chunk)), bank.base.device)
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        p = torch.softmax(logits[:, : len(labels)].float(), dim=-1)
        probs.append(p.view(len(chunk), len(members), len(labels)).cpu())
    bank.train(was_training)
    stacked = torch.cat(probs) if probs else torch.empty(0, len(members), len(labels))
    return stacked.argmax(-1), stacked


def majority_vote(votes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The most voted class per example; a tie goes to the tied class with the highest mean probability."""
    counts = torch.nn.functional.one_hot(votes, probs.shape[-1]).sum(1).float()  # (E, C)
    tie_break = probs.mean(1) * 1e-3  # < one vote: only decides between equal counts
    return (counts + tie_break).argmax(-1)


def ensemble_predict(bank: MultiTaskModel, members: Sequence[str], examples: Sequence[Example],
                     max_length: int = 128, batch_size: int = 64) -> list[str]:
    labels = _check(bank, members)
    votes, probs = ensemble_votes(bank, members, examples, max_length, batch_size)
    return [labels[i] for i in majority_vote(votes, probs).tolist()]


def evaluate_ensemble(bank: MultiTaskModel, members: Sequence[str], examples: Sequence[Example],
                      max_length: int = 128, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy and macro-F1 of the vote, and of each member alone (from the same forward)."""
    labels = _check(bank, members)
    votes, probs = ensemble_votes(bank, members, examples, max_length, batch_size)
    references = [ex.label or "" for ex in examples]
    vote = [labels[i] for i in majority_vote(votes, probs).tolist()]
    result: dict[str, Any] = dict(classification_metrics(vote, references, labels))
    result["members"] = {m: classification_metrics([labels[i] for i in votes[:, j].tolist()], references, labels)
                         for j, m in enumerate(members)}
    return result
