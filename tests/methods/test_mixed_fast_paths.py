"""The mixed-batch fast paths: compact stacks, rows gathered once per routing, prompts and prefixes of the
slots in the batch only. Each must give the same outputs as the rows run alone, and never serve stale
weights or routes after an in-place change.
"""

from __future__ import annotations

from typing import Any

import torch
from helpers import tiny_base

from multitune.bank import ModelInputs, MultiTaskModel
from multitune.methods.adapter import AdapterConfig, AdapterLinear
from multitune.methods.lora import LoRAConfig, LoRALinear
from multitune.methods.prefix import PrefixConfig
from multitune.methods.prompt import PromptConfig, prompts
from multitune.methods.prompt import inputs as prompt_inputs

TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy and great", "it is", "not bad"]


def _bank(extra_plain: int = 0) -> MultiTaskModel:
    """LoRA on q/v and on every linear layer, an adapter, a prompt, a prefix, and ``extra_plain`` prompt tasks."""
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("qv", "generation", "lora", LoRAConfig(rank=2, dropout=0.0))
    bank.add_task("all", "generation", "lora", LoRAConfig(rank=4, target_modules=["all-linear"], dropout=0.0))
    bank.add_task("adapter", "generation", "adapter", AdapterConfig(reduction_factor=4))
    bank.add_task("soft", "generation", "prompt", PromptConfig(num_virtual_tokens=3, init="random"))
    bank.add_task("prefix", "generation", "prefix", PrefixConfig(num_virtual_tokens=4, projection=False))
    for i in range(extra_plain):
        bank.add_task(
            f"p{i}", "generation", "prompt", PromptConfig(num_virtual_tokens=2 + i % 3, init="random")
        )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for task in bank.slots:
            for param in bank.task_parameters(task).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return bank


def _logits(bank: MultiTaskModel, texts: list[str], rows: torch.Tensor) -> torch.Tensor:
    enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt", padding_side="left")
    with torch.no_grad(), bank.routed(rows):
        inputs, width = bank.model_inputs(enc.input_ids, enc.attention_mask, rows)
        return bank.base.model(**inputs).logits[:, width:]


def _alone(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> list[torch.Tensor]:
    return [_logits(bank, [text], bank.task_ids(task, 1)) for text, task in zip(texts, tasks, strict=True)]


def _wrappers(bank: MultiTaskModel, cls: type) -> list[Any]:
    return [m for m in bank.base.model.modules() if isinstance(m, cls)]


def _assert_rows(mixed: torch.Tensor, alone: list[torch.Tensor]) -> None:
    for i, one in enumerate(alone):
        torch.testing.assert_close(mixed[i, -one.shape[1] :], one[0], atol=1e-5, rtol=0, msg=f"row {i}")


def test_stacks_hold_only_the_tasks_with_parameters_at_the_layer() -> None:
    bank = _bank(extra_plain=6)
    tasks = ["qv", "all", "adapter", "soft", "prefix", "p3"]
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    mixed = _logits(bank, TEXTS, rows)
    _assert_rows(mixed, _alone(bank, TEXTS, tasks))
    for layer in _wrappers(bank, LoRALinear):
        stack = layer.stacked.stack()
        (a, b, scale, _, _, ranks), where = stack.tensors, stack.where  # 5th: DoRA gains (None: no DoRA task)
        holders = [t for t in bank.slots if t in layer.lora_A]
        assert (
            a.shape[0] == b.shape[0] == scale.shape[0] == ranks.shape[0] == len(holders)
        )  # not one per slot
        assert where.shape == (1, len(bank.slots)) and int((where >= 0).sum()) == len(holders)
        assert ranks.tolist() == [layer.lora_A[t].shape[0] for t in holders]
    for layer in _wrappers(bank, AdapterLinear):
        assert layer.stacked.stack().tensors[0].shape[0] == 1


def test_rows_without_parameters_at_a_layer_pass_through_exactly() -> None:
    bank = _bank()
    layer = bank.base.model.model.layers[0].self_attn.k_proj  # only the all-linear LoRA adapts it
    assert isinstance(layer, LoRALinear) and list(layer.lora_A) == ["all"]
    x = torch.randn(4, 5, layer.in_features)
    rows = torch.tensor([bank.slots.index(t) for t in ["qv", "all", "soft", "all"]])
    with torch.no_grad(), bank.routed(rows):
        mixed = layer(x)
    base = layer.base_layer(x)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert not torch.allclose(mixed[1], base[1])


def test_a_reused_task_ids_tensor_never_serves_stale_weights_or_routes() -> None:
    bank = _bank()
    tasks = ["qv", "all", "adapter", "soft"]
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    before = _logits(bank, TEXTS[:4], rows)
    torch.testing.assert_close(
        _logits(bank, TEXTS[:4], rows), before, atol=0, rtol=0
    )  # served from the caches
    with torch.no_grad():  # an in-place update (an optimizer step, a load) of one task
        bank.task_parameters("all")["model.layers.0.self_attn.k_proj.lora_B.weight"].add_(0.5)
        bank.task_parameters("adapter")["model.layers.1.mlp.down_proj.adapter_up.weight"].add_(0.5)
    after = _logits(bank, TEXTS[:4], rows)
    _assert_rows(after, _alone(bank, TEXTS[:4], tasks))
    assert not torch.allclose(after[1], before[1]) and not torch.allclose(after[2], before[2])
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)
    rows[0], rows[1] = rows[1].clone(), rows[0].clone()  # the same tensor, rerouted in place
    swapped = _logits(bank, TEXTS[:4], rows)
    _assert_rows(swapped, _alone(bank, TEXTS[:4], ["all", "qv", "adapter", "soft"]))


def test_prompts_and_prefixes_of_a_large_bank_route_rows_of_few_tasks() -> None:
    bank = _bank(extra_plain=12)
    tasks = ["p11", "prefix", "p4", "soft", "p11", "qv"]
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    _assert_rows(_logits(bank, TEXTS, rows), _alone(bank, TEXTS, tasks))
    state = ModelInputs(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1, dtype=torch.long), rows)
    with torch.no_grad(), bank.routed(rows):
        prompt_inputs(bank, state)  # right-aligned per row, zeros before and for rows without a prompt
    virtual, table = state.virtual, prompts(bank)
    assert virtual is not None and virtual.shape == (6, 4, bank.base.hidden_size)
    torch.testing.assert_close(virtual[0, -table["p11"].shape[0] :], table["p11"], atol=0, rtol=0)
    assert not virtual[1].any() and not virtual[5].any() and not virtual[2, : 4 - table["p4"].shape[0]].any()
    assert state.virtual_mask is not None and state.virtual_mask.sum(1).tolist() == [
        table[t].shape[0] if t in table else 0 for t in tasks
    ]


def test_training_gradients_reach_only_the_tasks_in_the_batch_and_match_each_row_alone() -> None:
    bank = _bank(extra_plain=2)
    bank.train()
    tasks = ["qv", "all", "adapter", "p1"]
    enc = bank.base.tokenizer(TEXTS[:4], padding=True, return_tensors="pt", padding_side="left")
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    batch = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "task_ids": rows,
        # no target for padding nor for a first token (alone, nothing precedes it)
        "labels": enc.input_ids.masked_fill(
            (enc.attention_mask == 0) | (enc.attention_mask.cumsum(1) == 1), -100
        ),
    }
    nll, _ = bank.lm_loss(batch)
    nll.backward()
    mixed = {
        t: {k: p.grad.clone() for k, p in bank.task_parameters(t).items() if p.grad is not None}
        for t in tasks
    }
    assert all(p.grad is None for t in ["soft", "prefix", "p0"] for p in bank.task_parameters(t).values())
    bank.zero_grad(set_to_none=True)
    for i, task in enumerate(tasks):
        one = bank.base.tokenizer([TEXTS[i]], return_tensors="pt")  # unpadded: positions as the row alone
        bank.lm_loss(
            {
                "input_ids": one.input_ids,
                "attention_mask": one.attention_mask,
                "task_ids": bank.task_ids(task, 1),
                "labels": one.input_ids,
            }
        )[0].backward()
        for key, param in bank.task_parameters(task).items():
            if key in mixed[task]:
                torch.testing.assert_close(
                    mixed[task][key], param.grad, atol=1e-4, rtol=1e-4, msg=f"{task} {key}"
                )
        bank.zero_grad(set_to_none=True)


def test_a_task_without_rows_in_a_training_batch_gets_no_gradient_at_all() -> None:
    """Not zeros: AdamW moves a parameter whose gradient is zero (its moments decay into a step)."""
    bank = _bank(extra_plain=2)
    bank.add_task("norms", "generation", "adapter", AdapterConfig(reduction_factor=4, train_layer_norms=True))
    bank.add_task("ia3", "generation", "ia3", None)
    bank.train()
    enc = bank.base.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    rows = torch.tensor([bank.slots.index("qv"), bank.slots.index("p0")])
    nll, _ = bank.lm_loss(
        {
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "task_ids": rows,
            "labels": enc.input_ids.masked_fill(enc.attention_mask == 0, -100),
        }
    )
    nll.backward()
    for task in bank.slots:
        grads = [p.grad for p in bank.task_parameters(task).values()]
        if task in ("qv", "p0"):
            assert any(g is not None and g.abs().sum() > 0 for g in grads), task
        else:
            assert all(g is None for g in grads), task
