"""Examples to token ids, and token ids to padded batches.

Classification rows become ``input_ids`` plus a class index; domain rows (raw text) their token ids, with
targets as :mod:`multitune.domain` makes them. Generation rows on a causal LM become the
prompt (through the tokenizer's chat template when it has one) followed by the response and EOS, with
the loss on response tokens only (``labels`` is -100 over the prompt). On a seq2seq model the prompt is
the encoder input and the response the decoder target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.data import Example
from multitune.methods import get_method
from multitune.models import Base

IGNORE = -100


def prompt_ids(base: Base, prompt: str) -> list[int]:
    """Token ids of a generation prompt, ending where the response should begin."""
    tokenizer = base.tokenizer
    if base.arch == "seq2seq":
        return list(tokenizer(prompt).input_ids)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt + "\n").input_ids)


def encode_example(
    base: Base, spec: TaskSpec, example: Example, max_length: int, with_target: bool = True
) -> dict[str, Any]:
    """One example as token ids; ``with_target=False`` gives the generation prompt alone (for generate)."""
    tokenizer = base.tokenizer
    if spec.kind == "domain":  # raw text (multitune.domain): the document's ids, targets made per objective
        from multitune.domain import encode

        return encode(base, spec.objective or "", example.text, max_length)
    if spec.kind == "classification":
        if example.text_pair is not None and base.arch == "decoder":
            texts: tuple[Any, ...] = (example.text + "\n" + example.text_pair,)
        else:
            texts = (example.text, example.text_pair)
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        feature: dict[str, Any] = {"input_ids": list(enc.input_ids)}
        if len(enc.input_ids) >= max_length:  # cut, or exactly at the limit: only the full count tells which
            feature["truncated"] = len(tokenizer(*texts).input_ids) > max_length
        if example.label is not None and example.label in spec.labels:
            feature["class_label"] = spec.labels.index(example.label)
        return feature
    prompt = prompt_ids(base, example.text)
    if not with_target or example.response is None:
        return {"input_ids": prompt[-max_length:]}
    if base.arch == "seq2seq":
        target = list(
            tokenizer(text_target=example.response, truncation=True, max_length=max_length).input_ids
        )
        return {"input_ids": prompt[:max_length], "labels": target}
    response = list(tokenizer(example.response, add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    response = response[: max(1, max_length // 2)] if len(prompt) + len(response) > max_length else response
    prompt = prompt[-(max_length - len(response)) :]
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}


def encode_task(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int, with_target: bool = True
) -> list[dict[str, Any]]:
    """Features of a task's examples: its method's ``render`` first (prompting's templates), then
    :func:`encode_example`. Every encoding of a task's examples goes through here."""
    spec = bank.tasks[task]
    render = get_method(spec.method).render
    if render is not None:
        examples = render(bank, task, examples, max_length)
    return [encode_example(bank.base, spec, ex, max_length, with_target) for ex in examples]


def collate(
    features: Sequence[dict[str, Any]],
    pad_id: int,
    task_slot: int | Sequence[int],
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of features into a batch; ``task_slot`` is one slot for every row, or one per row."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[i, span] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, span] = 1
    slots = [task_slot] * len(features) if isinstance(task_slot, int) else list(task_slot)
    batch = {"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor(slots, dtype=torch.long)}
    if all("class_label" in f for f in features):
        batch["class_labels"] = torch.tensor([f["class_label"] for f in features], dtype=torch.long)
    if all("labels" in f for f in features):
        label_width = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), label_width), IGNORE, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch


def pack(features: Sequence[dict[str, Any]], task_slot: int) -> dict[str, torch.Tensor]:
    """Every example of a generation batch end to end in one row (``--packing``: TRL's padding-free packing).

    ``position_ids`` restart at 0 with each example, which is how transformers' masks tell packed sequences
    apart (``masking_utils.find_packed_sequence_indices``, used when no 2D attention mask is given): each token
    attends only to the earlier tokens of its own example, at the positions it has alone. The first token of
    each example is never a target (the token before it belongs to another example), as in the unpacked batch,
    where it is a prompt token. No padding: the row is as long as its examples together.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        target = list(f["labels"])
        target[0] = IGNORE
        ids += f["input_ids"]
        labels += target
        positions += range(len(f["input_ids"]))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "task_ids": torch.tensor([task_slot], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
