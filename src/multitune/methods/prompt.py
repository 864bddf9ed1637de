"""Prompt tuning: a task is n trainable virtual-token embeddings before its input (Lester et al. 2021).

The prompt P_t (n, d) lives in this method's store in the bank (:func:`prompts`); the ``inputs`` hook gives
each row of a batch its task's prompt as virtual token embeddings before its text (right-aligned when prompts
of different lengths share a batch, the gap masked; the bank counts positions over unmasked slots only). The
base is untouched, so any number of prompt-tuned tasks share one model and one batch.

Initialisation (section 3 of the paper, "Prompt Initialization"):
- ``random``: uniform in [-0.5, 0.5];
- ``vocab``: embeddings of tokens sampled from the 5,000 most frequent ids (low ids, for BPE vocabularies);
- ``labels``: the embeddings of the class labels' tokens first (each label must be one token), then
  ``vocab`` for the rest;
- ``text``: the embeddings of ``init_text``'s tokens, repeated or cut to n.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import Method, register
from multitune.methods.stack import SlotStack, Stack, join_right, slot_index
from multitune.methods.wrap import weight_of
from multitune.routing import Routing

if TYPE_CHECKING:
    from multitune.bank import ModelInputs, MultiTaskModel

INITS = ("random", "vocab", "labels", "text")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": "length n of the soft prompt"})
    init: str = field(default="vocab", metadata={"help": "initialisation: random, vocab, labels or text"})
    init_text: str | None = field(
        default=None, metadata={"help": "text whose token embeddings start the prompt (init=text)"}
    )

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"prompt num_virtual_tokens must be >= 1 (got {self.num_virtual_tokens})")
        if self.init not in INITS:
            problems.append(f"prompt init must be one of {', '.join(INITS)} (got '{self.init}')")
        if self.init == "text" and not (self.init_text or "").strip():
            problems.append("prompt init=text needs --prompt-init-text 'some words'")
        return problems


class PromptStore(nn.Module):
    """Every prompt-tuned task's prompt, and their stack for mixed batches.

    The stack holds the T prompts right-aligned to the longest (zeros before a shorter one) and one row of
    zeros last, which every slot without a prompt points to: a batch gathers one (L, d) block per row.
    """

    def __init__(self, routing: Routing) -> None:
        super().__init__()
        self.routing = routing
        self.prompts = nn.ParameterDict()  # task -> (n, d)
        self.stacked = SlotStack(routing, self._stack, lambda: self.prompts.values())

    def _stack(self, present: set[str] | None) -> Stack | None:
        tasks = [t for t in self.routing.slots if t in self.prompts and (present is None or t in present)]
        if not tasks:
            return None
        longest = max(self.prompts[t].shape[0] for t in tasks)
        ref = self.prompts[tasks[0]]
        rows = [
            torch.cat([ref.new_zeros(longest - self.prompts[t].shape[0], ref.shape[1]), self.prompts[t]])
            for t in tasks
        ]
        lengths = torch.tensor([self.prompts[t].shape[0] for t in tasks] + [0], device=ref.device)
        where = slot_index(self.routing, tasks, ref.device)
        where = torch.where(where < 0, len(tasks), where)  # slots without a prompt: the zero row
        return Stack((torch.stack(rows + [ref.new_zeros(longest, ref.shape[1])]), lengths), where)


def prompts(bank: MultiTaskModel) -> nn.ParameterDict:
    """task -> its soft prompt (n, d), for every prompt-tuned task of the bank."""
    return _store(bank).prompts


def _store(bank: MultiTaskModel) -> PromptStore:
    return bank.store("prompt", lambda: PromptStore(bank.routing))


def inputs(bank: MultiTaskModel, state: ModelInputs) -> None:
    """Each row's prompt before its text: (B, W, d) right-aligned to the batch's longest, the rest masked.

    A stacked task's rows get their components' prompts first, then their own: one block per level,
    joined contiguous and right-aligned (:func:`~multitune.methods.stack.join_right`)."""
    blocks, masks = [], []
    for rows in _store(bank).stacked.levels(state.input_ids.shape[0], bank.base.model.dtype):
        if rows is None:
            continue
        stacked, lengths = rows.tensors  # (B, longest, d), (B,)
        assert stacked is not None and lengths is not None
        width = int(lengths.max())
        if width == 0:
            continue
        positions = torch.arange(width, device=lengths.device)
        blocks.append(stacked[:, stacked.shape[1] - width :])
        masks.append(positions >= width - lengths[:, None])
    if blocks:
        state.add_virtual(*join_right(blocks, masks))


def positions(bank: MultiTaskModel, task: str) -> int:
    return int(prompts(bank)[task].shape[0])


def _single_token(tokenizer: Any, label: str) -> int | None:
    """The id of ``label`` when it is one token (with or without a leading space), else None."""
    for text in (label, " " + label):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) == 1:
            return int(ids[0])
    return None


def initial_prompt(bank: MultiTaskModel, task: str, config: PromptConfig) -> torch.Tensor:
    embeddings = weight_of(bank.base.model.get_input_embeddings()).detach()
    n, (vocab, d) = config.num_virtual_tokens, embeddings.shape
    if config.init == "random":
        return torch.empty(n, d, device=embeddings.device).uniform_(-0.5, 0.5)
    sampled = embeddings[torch.randint(0, min(vocab, 5000), (n,), device=embeddings.device)].float().clone()
    tokenizer = bank.base.tokenizer
    if config.init == "vocab":
        return sampled
    if config.init == "labels":
        labels = bank.tasks[task].labels
        if not labels:
            raise ConfigError(
                f"prompt init=labels needs a classification task with labels; '{task}' has none"
            )
        ids = {label: _single_token(tokenizer, label) for label in labels}
        long = [label for label, i in ids.items() if i is None]
        if long:
            raise ConfigError(
                f"prompt init=labels needs labels of one token each; {', '.join(map(repr, long[:5]))} "
                "are several tokens: use --prompt-init vocab or text"
            )
        label_rows = embeddings[torch.tensor(list(ids.values()), device=embeddings.device)].float()
        sampled[: min(n, len(labels))] = label_rows[:n]
        return sampled
    ids = tokenizer(config.init_text, add_special_tokens=False).input_ids  # init == "text"
    if not ids:
        raise ConfigError(f"prompt init_text {config.init_text!r} has no tokens; give some words")
    repeated = (ids * (n // len(ids) + 1))[:n]
    return embeddings[torch.tensor(repeated, device=embeddings.device)].float().clone()


def attach(bank: MultiTaskModel, task: str, config: PromptConfig) -> None:
    limit = getattr(bank.base.model.config, "max_position_embeddings", None) or getattr(
        bank.base.model.config, "n_positions", None
    )
    if limit is not None and config.num_virtual_tokens >= limit:
        raise ConfigError(
            f"a soft prompt of {config.num_virtual_tokens} tokens leaves no room for text in a "
            f"context of {limit} positions; use --prompt-num-virtual-tokens below {limit}"
        )
    prompt = nn.Parameter(initial_prompt(bank, task, config))
    store = _store(bank)
    store.prompts[task] = prompt
    store.stacked.invalidate()
    bank.own(task, "prompt.embeddings", prompt)


def detach(bank: MultiTaskModel, task: str) -> None:
    store = _store(bank)
    del store.prompts[task]
    store.stacked.invalidate()


def search(trial: Any) -> dict[str, Any]:
    return {"prompt.num_virtual_tokens": trial.suggest_categorical("prompt.num_virtual_tokens", [8, 20, 40])}


register(
    Method(
        name="prompt",
        config_class=PromptConfig,
        attach=attach,
        detach=detach,
        summary="trainable virtual-token embeddings before the input (Lester et al. 2021)",
        default_learning_rate=3e-2,
        inputs=inputs,
        positions=positions,
        search=search,
    )
)
