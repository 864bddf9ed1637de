"""Prompt tuning: learning, initialisation, mixed batches of different prompt lengths, generation, storage."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompt import PromptConfig, prompts
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate
from multitune.training.train import train

TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy"]


def _randomize(bank: MultiTaskModel, task: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.task_parameters(task).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_learns_the_toy_task(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("p", "classification", "prompt", PromptConfig(num_virtual_tokens=4), ["neg", "pos"])
    assert sum(p.numel() for p in bank.task_parameters("p").values()) == 4 * 32 + 32 * 2 + 2
    data = toy_sentiment(64)
    before = evaluate(bank, "p", data)["loss"]
    cfg = TrainConfig(epochs=8, batch_size=8, learning_rate=3e-2, warmup_ratio=0.0, patience=100)
    train(bank, "p", data, data[:16], cfg, progress=False)
    assert evaluate(bank, "p", data)["loss"] < 0.85 * before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_tuning_generation_learns_and_generates_with_the_cache(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("g", "generation", "prompt", PromptConfig(num_virtual_tokens=3))
    data = toy_generation(32)
    before = evaluate(bank, "g", data, generate=False)["loss"]
    cfg = TrainConfig(epochs=10, batch_size=8, learning_rate=5e-2, warmup_ratio=0.0, patience=100)
    train(bank, "g", data, data[:8], cfg, progress=False)
    assert evaluate(bank, "g", data, generate=False)["loss"] < 0.8 * before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_a_soft_prompt_equals_greedy_decoding_without_cache(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("g", "generation", "prompt", PromptConfig(num_virtual_tokens=3, init="random"))
    enc = base.tokenizer(
        ["good movie", "the film was bad"], padding=True, return_tensors="pt", padding_side="left"
    )
    rows = bank.task_ids("g", 2)
    got = bank.generate(enc.input_ids, enc.attention_mask, rows, max_new_tokens=5, do_sample=False)
    ids, mask = enc.input_ids, enc.attention_mask
    want = []
    with torch.no_grad():
        for _ in range(5):  # recompute the whole sequence each step: no KV cache involved
            with bank.routed(rows):
                inputs, width = bank.model_inputs(ids, mask, rows)
                logits = base.model(**inputs).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            want.append(token)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(got[:, :5], torch.cat(want, 1)[:, : got.shape[1]])


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_rows_with_prompts_of_different_lengths_equal_each_row_alone(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("short", "classification", "prompt", PromptConfig(num_virtual_tokens=2), ["a", "b"])
    bank.add_task("long", "classification", "prompt", PromptConfig(num_virtual_tokens=7), ["a", "b", "c"])
    bank.add_task("lora", "classification", "lora", LoRAConfig(rank=2), ["x", "y"])
    for i, task in enumerate(("short", "long", "lora")):
        _randomize(bank, task, seed=i)
    enc = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    rows = torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        mixed = bank.classify(enc.input_ids, enc.attention_mask, rows)
        for r, slot in enumerate(rows.tolist()):
            n = int(enc.attention_mask[r].sum())  # alone: no padding at all
            alone = bank.classify(
                enc.input_ids[r : r + 1, :n], enc.attention_mask[r : r + 1, :n], torch.tensor([slot])
            )
            torch.testing.assert_close(mixed[r : r + 1, : alone.shape[1]], alone, atol=1e-5, rtol=0)


def test_label_initialisation_uses_the_label_token_embeddings() -> None:
    base = tiny_base("bert")
    bank = MultiTaskModel(base)
    bank.add_task(
        "p", "classification", "prompt", PromptConfig(num_virtual_tokens=5, init="labels"), ["bad", "good"]
    )
    table = base.model.get_input_embeddings().weight
    ids = base.tokenizer(["bad", "good"], add_special_tokens=False).input_ids
    torch.testing.assert_close(prompts(bank)["p"][:2], table[[ids[0][0], ids[1][0]]])
    with pytest.raises(ConfigError, match="labels of one token each; 'very good'"):
        bank.add_task("q", "classification", "prompt", PromptConfig(init="labels"), ["very good", "bad"])
    assert "q" not in bank.tasks and "q" not in prompts(bank)


def test_text_and_random_initialisation() -> None:
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    bank.add_task(
        "t", "generation", "prompt", PromptConfig(num_virtual_tokens=5, init="text", init_text="good movie")
    )
    table = base.model.get_input_embeddings().weight
    ids = base.tokenizer("good movie", add_special_tokens=False).input_ids
    torch.testing.assert_close(prompts(bank)["t"], table[(ids * 3)[:5]])
    bank.add_task("r", "generation", "prompt", PromptConfig(num_virtual_tokens=50, init="random"))
    assert prompts(bank)["r"].abs().max() <= 0.5 and prompts(bank)["r"].std() > 0.2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (PromptConfig(num_virtual_tokens=0), "num_virtual_tokens must be >= 1"),
        (PromptConfig(init="magic"), "init must be one of"),
        (PromptConfig(init="text"), "needs --prompt-init-text"),
        (PromptConfig(num_virtual_tokens=500), "leaves no room for text in a context of 128"),
    ],
)
def test_bad_prompt_configs(config: PromptConfig, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        MultiTaskModel(tiny_base("gpt2")).add_task("p", "generation", "prompt", config)


def test_save_load_and_remove(tmp_path) -> None:
    base = tiny_base("gpt2")
    bank = MultiTaskModel(base)
    bank.add_task("p", "classification", "prompt", PromptConfig(num_virtual_tokens=3), ["a", "b"])
    _randomize(bank, "p", seed=4)
    enc = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = bank.classify(enc.input_ids, enc.attention_mask, bank.task_ids("p", 4))
    save_adapter(bank, "p", tmp_path / "a")
    fresh = MultiTaskModel(tiny_base("gpt2"))
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        got = fresh.classify(enc.input_ids, enc.attention_mask, fresh.task_ids("p", 4))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    fresh.remove_task("p")
    assert not prompts(fresh) and not fresh.tasks
