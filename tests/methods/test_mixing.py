"""Mixed-task batches across methods: every pair of methods in one batch equals each row run alone.

One frozen base, tasks of every method (and two settings of each), rows of different tasks in one forward.
Each row's output must equal that task run alone (fp32, atol 1e-5): padding, attention masks and
positions must be right for different numbers of virtual tokens and prefixes.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from helpers import FAMILIES, perturb, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.methods import METHODS as REGISTRY
from multitune.methods import get_method
from multitune.methods.adapter import AdapterConfig
from multitune.methods.ia3 import IA3Config
from multitune.methods.lora import LoRAConfig
from multitune.methods.prefix import PrefixConfig, encoders
from multitune.methods.prompt import PromptConfig, prompts
from multitune.methods.prompting import PromptingConfig

TEXTS = [
    "good movie",
    "the film was very bad and not nice",
    "what",
    "so happy and great",
    "it is",
    "not bad",
    "the food was awful",
    "really quite fine",
    "how",
    "love it",
    "poor service",
    "nice place",
]


def variants(method: str) -> list[Any]:
    """Two settings of each method (different ranks, lengths, placements, targets); a method registered
    without known variants mixes with its defaults twice."""
    return {
        "base": [None, None],
        "lora": [LoRAConfig(rank=2), LoRAConfig(rank=4, target_modules=["all-linear"], rslora=True)],
        "prompt": [
            PromptConfig(num_virtual_tokens=2, init="random"),
            PromptConfig(num_virtual_tokens=5, init="random"),
        ],
        "prefix": [PrefixConfig(num_virtual_tokens=3), PrefixConfig(num_virtual_tokens=6, projection=False)],
        "adapter": [
            AdapterConfig(reduction_factor=8),
            AdapterConfig(
                reduction_factor=4, placement="pfeiffer", activation="gelu", train_layer_norms=True
            ),
        ],
        "ia3": [IA3Config(), IA3Config(target_modules=["all-linear"], feedforward_modules=[])],
        "prompting": [PromptingConfig(), PromptingConfig(shots=2)],
    }.get(method, [None, None])


# every registered method that shares the base (full fine-tuning owns a copy of it: a bank of its own)
METHODS = sorted(name for name, method in REGISTRY.items() if not method.changes_base)


def _add(
    bank: MultiTaskModel, name: str, method: str, config: Any, kind: str, labels: list[str] | None
) -> None:
    bank.add_task(name, kind, method, config, labels)
    fit = get_method(method).fit
    if fit is not None:
        data = toy_sentiment(16) if kind == "classification" else toy_generation(8)
        if kind == "classification":
            data = [
                type(ex)(text=ex.text, label={"pos": labels[0], "neg": labels[1]}[ex.label]) for ex in data
            ]
        fit(bank, name, data)
    perturb(bank, name, len(bank.slots), scale=0.15)


def _logits(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> torch.Tensor:
    enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt")
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    with torch.no_grad():
        return bank.classify(enc.input_ids, enc.attention_mask, rows)


def _check_rows_alone(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> None:
    mixed = _logits(bank, texts, tasks)
    for i, task in enumerate(tasks):
        alone = _logits(bank, [texts[i]], [task])
        width = alone.shape[1]
        torch.testing.assert_close(
            mixed[i : i + 1, :width], alone, atol=1e-5, rtol=0, msg=f"row {i} ({task})"
        )
        assert torch.isinf(mixed[i, width:]).all()  # label columns beyond the task's own are -inf


PAIRS = [(a, b) for a, b in itertools.combinations_with_replacement(METHODS, 2)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_every_pair_of_methods_in_one_batch_equals_each_row_alone(
    first: str, second: str, family: str
) -> None:
    bank = MultiTaskModel(tiny_base(family))
    _add(bank, "a", first, variants(first)[0], "classification", ["neg", "pos"])
    _add(bank, "b", second, variants(second)[1], "classification", ["neg", "pos", "other"])
    tasks = ["a", "b"] * 3
    _check_rows_alone(bank, TEXTS[: len(tasks)], tasks)


def _everything(family: str, kind: str) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    for method in METHODS:
        for i, config in enumerate(variants(method)):
            labels = ["neg", "pos", "x"][: 2 + i] if kind == "classification" else None
            _add(bank, f"{method}{i}", method, config, kind, labels)
    return bank


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_every_method_twice_equals_each_row_alone(family: str) -> None:
    bank = _everything(family, "classification")
    tasks = list(bank.slots)  # 14 tasks, one row each, texts of different lengths
    _check_rows_alone(bank, (TEXTS * 2)[: len(tasks)], tasks)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_mixed_generation_with_the_cache_equals_each_task_generating_alone(family: str) -> None:
    bank = _everything(family, "generation")
    tasks = [
        t for t in bank.slots if not t.startswith("prompting")
    ]  # prompting rewrites the text, not the model
    tokenizer = bank.base.tokenizer
    texts = (TEXTS * 2)[: len(tasks)]
    side = "left" if family != "t5" else "right"
    enc = tokenizer(texts, padding=True, return_tensors="pt", padding_side=side)
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    mixed = bank.generate(
        enc.input_ids, enc.attention_mask, rows, max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    outputs = set()
    for i, task in enumerate(tasks):
        one = tokenizer([texts[i]], return_tensors="pt")
        alone = bank.generate(
            one.input_ids,
            one.attention_mask,
            bank.task_ids(task, 1),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
        )
        assert mixed[i].tolist() == alone[0].tolist(), task
        outputs.add((texts[i], tuple(alone[0].tolist())))
    assert len({out for _, out in outputs}) > 1  # the tasks really generate differently


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_tasks_are_added_and_removed_at_run_time_without_touching_the_others(family: str) -> None:
    bank = _everything(family, "classification")
    texts = (TEXTS * 2)[: len(bank.slots)]
    before = {t: _logits(bank, [texts[i]], [t]) for i, t in enumerate(bank.slots)}
    base_state = tiny_base(family).model.state_dict()  # the same seed: the base before any task
    for removed in list(bank.slots):
        bank.remove_task(removed)
        for task in bank.slots:
            j = list(before).index(task)
            torch.testing.assert_close(_logits(bank, [texts[j]], [task]), before[task], atol=1e-6, rtol=0)
        if len(bank.slots) == 7:  # half-way: a new task of every method arrives, the others stay as they were
            for method in METHODS:
                _add(bank, f"new-{method}", method, variants(method)[1], "classification", ["a", "b"])
            for task in [t for t in bank.slots if not t.startswith("new-")]:
                j = list(before).index(task)
                torch.testing.assert_close(_logits(bank, [texts[j]], [task]), before[task], atol=1e-6, rtol=0)
            for method in METHODS:
                bank.remove_task(f"new-{method}")
    assert not bank.tasks and not prompts(bank) and not encoders(bank)
    # every wrapper is gone: the base's modules and weights are as they were
    state = bank.base.model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in state)
