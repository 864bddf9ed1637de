"""Prefix tuning: learning, folding, mixed batches, generation with the cache, storage, bad settings."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, perturb, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.methods.prefix import PrefixConfig, encoders, fold, geometry
from multitune.methods.prompt import PromptConfig
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate
from multitune.training.train import train

TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy", "it is"]


def _logits(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> torch.Tensor:
    enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt")
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    with torch.no_grad():
        return bank.classify(enc.input_ids, enc.attention_mask, rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_learns_the_toy_task_and_folds_to_plain_prefixes(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("p", "classification", "prefix", PrefixConfig(num_virtual_tokens=4), ["neg", "pos"])
    geo = geometry(bank)
    d, w = 32, geo.width
    counts = {k: p.numel() for k, p in bank.task_parameters("p").items()}
    assert counts == {
        "prefix.embedding": 4 * d,
        "prefix.mlp.0.weight": d * d,
        "prefix.mlp.0.bias": d,
        "prefix.mlp.2.weight": w * d,
        "prefix.mlp.2.bias": w,
        "head.weight": 2 * d,
        "head.bias": 2,
    }
    data = toy_sentiment(64)
    before = evaluate(bank, "p", data)["loss"]
    cfg = TrainConfig(epochs=8, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    train(bank, "p", data, data[:16], cfg, progress=False)
    assert evaluate(bank, "p", data)["loss"] < 0.85 * before
    # train() folded the MLP away: what is left is the (n, layers * 2 * kv_dim) prefix tensor and the head
    assert {k: p.numel() for k, p in bank.task_parameters("p").items()} == {
        "prefix.embeddings": 4 * w,
        "head.weight": 2 * d,
        "head.bias": 2,
    }
    assert bank.tasks["p"].config["projection"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_keeps_the_outputs(family: str) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("p", "classification", "prefix", PrefixConfig(num_virtual_tokens=3), ["a", "b"])
    perturb(bank, "p", 1)
    before = _logits(bank, TEXTS, ["p"] * len(TEXTS))
    fold(bank, "p")
    torch.testing.assert_close(_logits(bank, TEXTS, ["p"] * len(TEXTS)), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_prefix_tuning_generation_learns(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("g", "generation", "prefix", PrefixConfig(num_virtual_tokens=3))
    data = toy_generation(32)
    before = evaluate(bank, "g", data, generate=False)["loss"]
    cfg = TrainConfig(epochs=10, batch_size=8, learning_rate=3e-2, warmup_ratio=0.0, patience=100)
    train(bank, "g", data, data[:8], cfg, progress=False)
    assert evaluate(bank, "g", data, generate=False)["loss"] < 0.8 * before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_prefixes_equals_greedy_decoding_without_cache(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("g", "generation", "prefix", PrefixConfig(num_virtual_tokens=3, projection=False))
    perturb(bank, "g", 2, scale=1.0)
    enc = base.tokenizer(
        ["good movie", "the film was bad"], padding=True, return_tensors="pt", padding_side="left"
    )
    rows = bank.task_ids("g", 2)
    got = bank.generate(
        enc.input_ids, enc.attention_mask, rows, max_new_tokens=5, do_sample=False, eos_token_id=None
    )
    ids, mask, want = enc.input_ids, enc.attention_mask, []
    with torch.no_grad():
        for _ in range(5):  # the whole sequence each step, a fresh prefix cache each time
            with bank.routed(rows):
                inputs, _ = bank.model_inputs(ids, mask, rows)
                token = base.model(**inputs).logits[:, -1].argmax(-1, keepdim=True)
            want.append(token)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(got, torch.cat(want, 1))
    with bank.disabled():
        plain = bank.generate(
            enc.input_ids, enc.attention_mask, rows, max_new_tokens=5, do_sample=False, eos_token_id=None
        )
    assert not torch.equal(plain, got)  # the prefixes change what is generated


def _mixed_bank(family: str, kind: str) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    labels = {"classification": ["a", "b", "c"], "generation": None}[kind]
    bank.add_task("short", kind, "prefix", PrefixConfig(num_virtual_tokens=2), labels)
    bank.add_task("long", kind, "prefix", PrefixConfig(num_virtual_tokens=6, projection=False), labels)
    bank.add_task("soft", kind, "prompt", PromptConfig(num_virtual_tokens=3, init="random"), labels)
    bank.add_task("lora", kind, "lora", LoRAConfig(rank=2), labels)
    for i, task in enumerate(bank.slots):
        perturb(bank, task, 10 + i, scale=0.5)
    return bank


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_rows_with_prefixes_prompts_and_lora_equal_each_row_alone(family: str) -> None:
    bank = _mixed_bank(family, "classification")
    tasks = ["short", "long", "soft", "lora", "long"]
    mixed = _logits(bank, TEXTS, tasks)
    for i, task in enumerate(tasks):
        alone = _logits(bank, [TEXTS[i]], [task])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_mixed_generation_equals_each_row_alone(family: str) -> None:
    bank = _mixed_bank(family, "generation")
    tokenizer = bank.base.tokenizer
    side = "left" if family != "t5" else "right"
    tasks = ["short", "long", "soft", "lora"]
    enc = tokenizer(TEXTS[:4], padding=True, return_tensors="pt", padding_side=side)
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    mixed = bank.generate(
        enc.input_ids, enc.attention_mask, rows, max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    for i, task in enumerate(tasks):
        one = tokenizer([TEXTS[i]], return_tensors="pt")
        alone = bank.generate(
            one.input_ids,
            one.attention_mask,
            bank.task_ids(task, 1),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
        )
        assert mixed[i].tolist() == alone[0].tolist(), task


def test_gradients_of_a_task_come_only_from_its_own_rows() -> None:
    bank = _mixed_bank("llama", "classification")
    bank.train()
    labels = torch.tensor([0, 1, 2, 0, 1])
    tasks = ["short", "long", "soft", "lora", "short"]

    def grads(texts: list[str], row_tasks: list[str], y: torch.Tensor) -> dict[str, torch.Tensor]:
        bank.zero_grad(set_to_none=True)
        enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt")
        rows = torch.tensor([bank.slots.index(t) for t in row_tasks])
        logits = bank.classify(enc.input_ids, enc.attention_mask, rows)
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        return {k: p.grad.clone() for k, p in bank.task_parameters("short").items() if p.grad is not None}

    mixed = grads(TEXTS, tasks, labels)
    alone = grads([TEXTS[0], TEXTS[4]], ["short", "short"], labels[[0, 4]])
    assert mixed.keys() == alone.keys() and "prefix.mlp.2.weight" in mixed
    for key in mixed:
        torch.testing.assert_close(mixed[key], alone[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_prefixes_give_the_base_outputs(family: str) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("p", "classification", "prefix", PrefixConfig(num_virtual_tokens=3), ["a", "b"])
    bank.add_task(
        "none", "classification", "lora", LoRAConfig(rank=1, target_modules=["all-linear"]), ["a", "b"]
    )
    perturb(bank, "p", 3, scale=1.0)
    with torch.no_grad():  # the same head on a task whose adapter is a no-op (LoRA's B starts at zero)
        bank.heads["none"].load_state_dict(bank.heads["p"].state_dict())
    with bank.disabled():
        off = _logits(bank, TEXTS, ["p"] * len(TEXTS))
    plain = _logits(bank, TEXTS, ["none"] * len(TEXTS))  # LoRA B is zero: the base model
    on = _logits(bank, TEXTS, ["p"] * len(TEXTS))
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)
    assert (on - off).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_give_identical_outputs(family: str, tmp_path) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("p", "classification", "prefix", PrefixConfig(num_virtual_tokens=3), ["a", "b"])
    perturb(bank, "p", 4)
    fold(bank, "p")
    want = _logits(bank, TEXTS, ["p"] * len(TEXTS))
    save_adapter(bank, "p", tmp_path / "adapter")
    other = MultiTaskModel(tiny_base(family))
    load_adapter(other, tmp_path / "adapter")
    torch.testing.assert_close(_logits(other, TEXTS, ["p"] * len(TEXTS)), want, atol=0, rtol=0)


def test_remove_task_leaves_the_other_tasks_alone() -> None:
    bank = _mixed_bank("gpt2", "classification")
    keep = ["long", "soft", "lora"]
    before = _logits(bank, TEXTS[:3], keep)
    bank.remove_task("short")
    assert "short" not in encoders(bank)
    torch.testing.assert_close(_logits(bank, TEXTS[:3], keep), before, atol=1e-6, rtol=0)


def test_bad_prefix_settings_give_clear_errors() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match="--prefix-num-virtual-tokens below 128"):
        bank.add_task("p", "generation", "prefix", PrefixConfig(num_virtual_tokens=200))
    with pytest.raises(ConfigError, match="num_virtual_tokens must be >= 1"):
        bank.add_task("p", "generation", "prefix", PrefixConfig(num_virtual_tokens=0))
    assert not bank.tasks and not encoders(bank)
