"""Scoring responses: their log-probabilities under a generation task, and reward scores.

:func:`sequence_logps` encodes (prompt, response) as training encodes generation and sums the response tokens'
log-probabilities (the LM head runs on the response positions only); :func:`reward_scores` reads a reward
model (a classification task with labels ``["rejected", "chosen"]``) as ``logit[chosen] - logit[rejected]``,
the scalar a Bradley-Terry model compares (Ouyang et al. 2022, section 3.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.data import Example
from multitune.encode import IGNORE, collate, encode_task, prompt_ids, to_device
from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.models import supports_logits_to_keep
from multitune.training.evaluate import autocast

REWARD_LABELS = ["rejected", "chosen"]  # score = logit[chosen] - logit[rejected]
TIE = 1e-4  # implicit-reward differences (nats) this small are ties: float noise of a policy equal to its reference


def length_batches(lengths: Sequence[int], batch_size: int) -> tuple[list[list[int]], torch.Tensor]:
    """Row indices in batches of similar lengths (less padding), and the permutation that restores the order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)], inverse


def _decoder_logps(bank: MultiTaskModel, features: Sequence[dict[str, Any]], slot: int) -> torch.Tensor:
    """Summed response log-probabilities of one batch on a causal LM.

    Rows are left-padded so that every response ends at the last position; the LM head then runs only on
    the last (longest response + 1) positions (``logits_to_keep``), not over the prompts: with a 49k
    vocabulary the logits of whole rows would be most of the memory.
    """
    pad = bank.base.tokenizer.pad_token_id
    batch = to_device(collate(features, pad, slot, padding_side="left"), bank.base.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scored = [min(sum(t != IGNORE for t in f["labels"]), len(f["input_ids"]) - 1) for f in features]
    keep = max(1, max(scored))
    if supports_logits_to_keep(bank.base.model):  # left padding: the bank's positions count real tokens only
        logits = bank.run(ids, mask, batch["task_ids"], logits_to_keep=keep + 1).out.logits
    else:
        logits = bank.run(ids, mask, batch["task_ids"]).out.logits[:, -(keep + 1) :]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)  # (B, keep)
    positions = torch.arange(keep, device=ids.device)
    valid = positions[None, :] >= keep - torch.tensor(scored, device=ids.device)[:, None]
    return (token_logp * valid).sum(-1)


def _seq2seq_logps(bank: MultiTaskModel, features: Sequence[dict[str, Any]], slot: int) -> torch.Tensor:
    """Summed response log-probabilities of one batch on an encoder-decoder (the response is the target)."""
    pad = bank.base.tokenizer.pad_token_id
    batch = to_device(collate(features, pad, slot), bank.base.device)
    labels = batch["labels"]
    logits = bank.run(
        batch["input_ids"],
        batch["attention_mask"],
        batch["task_ids"],
        labels=labels,
        decoder_length=labels.shape[1],
    ).out.logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * (labels != IGNORE)).sum(-1)


def sequence_logps(
    bank: MultiTaskModel,
    task: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    desc: str | None = None,
) -> torch.Tensor:
    """(N,) summed log-probability of each response given its prompt under generation task ``task``.

    Encoded as training encodes generation (:func:`multitune.encode.encode_task`: the chat template when
    the tokenizer has one, the response followed by EOS, the prompt cut from the left to fit
    ``max_length``). Differentiable; wrap in ``torch.no_grad()`` to score, in ``bank.disabled()`` for the
    reference model. ``desc``: show a progress bar over the batches with this title.
    """
    spec = bank.spec(task)
    if spec.kind != "generation":
        raise ConfigError(
            f"task '{task}' is a {spec.kind} task; response log-probabilities need a generation task"
        )
    if bank.base.arch == "encoder":
        raise ConfigError(
            f"{bank.base.source} is an encoder and has no next-token probabilities; use a causal LM "
            "such as smollm2-135m"
        )
    if len(prompts) != len(responses):
        raise ConfigError(
            f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt"
        )
    if not prompts:
        return torch.zeros(0, device=bank.base.device)
    examples = [Example(text=p, response=r) for p, r in zip(prompts, responses, strict=True)]
    features = encode_task(bank, task, examples, max_length, with_target=True)
    slot = bank.slots.index(task)
    score = _seq2seq_logps if bank.base.arch == "seq2seq" else _decoder_logps
    batches, inverse = length_batches([len(f["input_ids"]) + len(f["labels"]) for f in features], batch_size)
    with autocast(bank):
        out = torch.cat(
            [score(bank, [features[i] for i in rows], slot) for rows in progress_bar(batches, desc)]
        )
    return out[inverse.to(out.device)]


def response_tokens(
    bank: MultiTaskModel, task: str, prompts: Sequence[str], responses: Sequence[str], max_length: int = 256
) -> torch.Tensor:
    """(N,) how many tokens of each response :func:`sequence_logps` sums over (EOS included, after the same
    cut to ``max_length``): the lengths that length-normalised losses (IPO, SimPO, ORPO) divide by."""
    examples = [Example(text=p, response=r) for p, r in zip(prompts, responses, strict=True)]
    features = encode_task(bank, task, examples, max_length, with_target=True)
    counts = [sum(1 for label in f["labels"] if label != -100) for f in features]
    return torch.tensor(counts, dtype=torch.float32, device=bank.base.device).clamp(min=1)


def progress_bar(batches: list[list[int]], desc: str | None) -> Any:
    """The batches, with a progress bar on stderr when ``desc`` is given (long scoring passes)."""
    return tqdm(batches, desc=desc, leave=False, dynamic_ncols=True) if desc else batches


def joined_ids(bank: MultiTaskModel, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids a reward model reads: the prompt as generation encodes it, then the response and EOS.

    The same tokens a policy produces, so a reward model scores PPO rollouts as it saw its training
    pairs. Too long: the prompt loses its beginning (down to half of ``max_length``), then the response
    its end.
    """
    tokenizer = bank.base.tokenizer
    head = prompt_ids(bank.base, prompt)
    tail = list(tokenizer(response, add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    if len(head) + len(tail) > max_length:
        kept_prompt = min(len(head), max(max_length - len(tail), max_length // 2))
        head = head[len(head) - kept_prompt :]
        tail = tail[: max_length - len(head)]
    return head + tail


def check_reward_task(bank: MultiTaskModel, task: str) -> TaskSpec:
    spec = bank.spec(task)
    if spec.kind != "classification" or spec.labels != REWARD_LABELS:
        raise ConfigError(
            f"task '{task}' is not a reward model (a classification task with labels {REWARD_LABELS}); "
            "add one with add_reward_task or train it with 'multitune reward'"
        )
    return spec


def score_rows(
    bank: MultiTaskModel, task: str, prompts: Sequence[str], responses: Sequence[str], max_length: int = 256
) -> torch.Tensor:
    """(N,) differentiable reward scores of one batch: logit[chosen] - logit[rejected] of reward task ``task``."""
    check_reward_task(bank, task)
    features = [
        {"input_ids": joined_ids(bank, p, r, max_length)} for p, r in zip(prompts, responses, strict=True)
    ]
    batch = to_device(
        collate(features, bank.base.tokenizer.pad_token_id, bank.slots.index(task)), bank.base.device
    )
    with autocast(bank):
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"]).float()
    return logits[:, 1] - logits[:, 0]


def reward_scores(
    bank: MultiTaskModel,
    task: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    desc: str | None = None,
) -> torch.Tensor:
    """(N,) reward scores of (prompt, response) rows, without gradients (what PPO's reward reads)."""
    if len(prompts) != len(responses):
        raise ConfigError(
            f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt"
        )
    check_reward_task(bank, task)
    if not prompts:
        return torch.zeros(0)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]  # characters: a cheap proxy
    batches, inverse = length_batches(lengths, batch_size)
    with torch.no_grad():
        out = torch.cat(
            [
                score_rows(bank, task, [prompts[i] for i in rows], [responses[i] for i in rows], max_length)
                for rows in progress_bar(batches, desc)
            ]
        )
    return out[inverse.to(out.device)]


def add_reward_task(
    bank: MultiTaskModel, task: str = "reward", method: str = "lora", config: Any = None
) -> TaskSpec:
    """Add a reward model: a classification task with labels ["rejected", "chosen"] (score = their logit gap)."""
    check_trainable(method, head=True)
    return bank.add_task(task, "classification", method, config, list(REWARD_LABELS))


def check_trainable(method: str, head: bool = False) -> None:
    """Methods with parameters to train; ``head``: a classification head counts (the base method's probe)."""
    spec_method = get_method(method)
    if spec_method.fit is not None or spec_method.score is not None or (method == "base" and not head):
        raise ConfigError(
            f"method '{method}' has no adapter to train here; choose one of: {', '.join(trainable_methods())}"
        )


def trainable_methods() -> list[str]:
    """The methods DPO, PPO and a reward model can train: those with parameters (not prompting, not the
    bare base, whose only parameters would be a classification head)."""
    return [n for n, m in sorted(METHODS.items()) if m.fit is None and m.score is None and n != "base"]


def ranked_accuracy(diff: torch.Tensor, tie: float = 0.0) -> float:
    """Fraction of pairs ranked right; ties count half, so that a model that cannot tell scores 0.5."""
    if diff.numel() == 0:
        return float("nan")
    right = (diff > tie).double() + 0.5 * (diff.abs() <= tie).double()
    return float(right.mean())
