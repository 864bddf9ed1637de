"""Rewards for PPO: functions ``(prompts, responses) -> (N,) tensor`` from a Python function, the probability of a
label of a trained classification task, or a trained reward model; one score per response, checked.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.training.evaluate import autocast

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


# ---- rewards -------------------------------------------------------------------------------------
def as_scores(out: Any, n: int, where: str) -> torch.Tensor:
    try:
        scores = torch.as_tensor(out, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"the reward {where} must return {n} numbers (a list or tensor); it returned {type(out).__name__}"
        ) from error
    if scores.numel() != n:
        raise ConfigError(
            f"the reward {where} returned {scores.numel()} scores for {n} responses; return one per response"
        )
    if not torch.isfinite(scores).all():
        raise ConfigError(f"the reward {where} returned a NaN or infinite score; return finite numbers")
    return scores


def reward_from_function(fn: Callable[[list[str], list[str]], Any]) -> RewardFn:
    """A Python function ``fn(prompts, responses) -> N numbers`` as a reward (checked: one finite score each)."""
    name = getattr(fn, "__name__", repr(fn))

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return as_scores(fn(list(prompts), list(responses)), len(responses), f"function {name}")

    return reward


def reward_from_classifier(
    bank: MultiTaskModel,
    task: str,
    label: str,
    include_prompt: bool = False,
    max_length: int = 256,
    batch_size: int = 16,
) -> RewardFn:
    """The probability of ``label`` under a trained classification task of ``bank`` (any bank and base).

    The classifier reads the response alone, or prompt and response as a text pair with ``include_prompt``.
    """
    spec = bank.spec(task)
    if spec.kind != "classification":
        raise ConfigError(
            f"task '{task}' is a {spec.kind} task; a reward classifier must be a classification task"
        )
    if label not in spec.labels:
        raise ConfigError(
            f"label '{label}' is not a label of task '{task}'; its labels: {', '.join(spec.labels)}"
        )
    column = spec.labels.index(label)
    for param in bank.task_parameters(task).values():
        param.requires_grad_(False)  # a judge, never trained here

    @torch.no_grad()
    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        examples = [
            Example(text=p, text_pair=r) if include_prompt else Example(text=r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        slot, pad = bank.slots.index(task), bank.base.tokenizer.pad_token_id
        out = []
        for start in range(0, len(examples), batch_size):
            features = encode_task(bank, task, examples[start : start + batch_size], max_length)
            batch = to_device(collate(features, pad, slot), bank.base.device)
            with autocast(bank):
                logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
            out.append(torch.softmax(logits[:, : len(spec.labels)].float(), -1)[:, column].cpu())
        return torch.cat(out)

    return reward


def reward_from_model(
    bank: MultiTaskModel, task: str, max_length: int = 256, batch_size: int = 16
) -> RewardFn:
    """A trained reward model task (multitune.preference): its score logit[chosen] - logit[rejected]."""
    from multitune.preference.scoring import reward_scores

    bank.spec(task)
    for param in bank.task_parameters(task).values():
        param.requires_grad_(False)

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores = reward_scores(
            bank, task, list(prompts), list(responses), max_length=max_length, batch_size=batch_size
        )
        return scores.detach().float().cpu().reshape(-1)

    return reward


def load_python_reward(spec: str) -> RewardFn:
    """``module:function`` or ``path/to/file.py:function`` as a checked reward function."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ConfigError(f"--reward-python must be MODULE:FUNCTION or FILE.py:FUNCTION (got '{spec}')")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"reward file {path} not found; give an existing FILE.py:FUNCTION")
            loader = importlib.util.spec_from_file_location(f"multitune_reward_{path.stem}", path)
            assert loader is not None and loader.loader is not None  # a .py file always has a loader
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # a module in the working directory, as `python -m` finds it
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"cannot import the reward module '{module_name}': {error}; check --reward-python"
        ) from error
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"'{module_name}' has no function '{function}'; check --reward-python")
    return reward_from_function(fn)
