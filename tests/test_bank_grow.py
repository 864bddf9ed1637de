"""MultiTaskModel.grow_labels: a classification task gains labels; old labels' logits and other tasks unchanged."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.encode import collate, encode_task
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompting import PromptingConfig
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import predict_labels
from multitune.training.train import train

ROWS = toy_sentiment(6)


def _logits(bank: MultiTaskModel, task: str, rows: list[Example] = ROWS) -> torch.Tensor:
    batch = collate(
        encode_task(bank, task, rows, 64), bank.base.tokenizer.pad_token_id, bank.slots.index(task)
    )
    with torch.no_grad():
        return bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])


def _lm_logits(bank: MultiTaskModel, task: str) -> torch.Tensor:
    batch = collate(encode_task(bank, task, toy_generation(3), 64), 0, bank.slots.index(task))
    with torch.no_grad():
        return bank.target_logits(batch)[0]


def _bank(family: str = "bert", method: str = "lora", config=None) -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("t", "classification", method, config, ["neg", "pos"])
    perturb(bank, "t", seed=1)
    return bank


@pytest.mark.parametrize(("family", "method"), [("bert", "lora"), ("llama", "prefix"), ("gpt2", "full")])
def test_a_grown_head_keeps_every_old_logit_exactly(family: str, method: str) -> None:
    bank = _bank(family, method)
    before = _logits(bank, "t")
    old_head = {k: v.clone() for k, v in bank.task_state_dict("t").items() if k.startswith("head.")}
    bank.grow_labels("t", ["question", "other"])
    after = _logits(bank, "t")
    assert bank.tasks["t"].labels == ["neg", "pos", "question", "other"]
    assert after.shape == (len(ROWS), 4)
    assert torch.allclose(after[:, :2], before, rtol=0, atol=1e-5)  # exact weights; a wider matmul's rounding
    owned = bank.task_parameters("t")
    assert owned["head.weight"] is bank.heads["t"].weight and owned["head.bias"] is bank.heads["t"].bias
    assert owned["head.weight"].shape == (4, bank.base.hidden_size) and owned["head.weight"].requires_grad
    assert torch.equal(owned["head.weight"][:2], old_head["head.weight"])
    assert torch.equal(owned["head.bias"][:2], old_head["head.bias"])
    bound = bank.base.hidden_size**-0.5  # nn.Linear's default initialisation for the new rows
    assert 0 < owned["head.weight"][2:].abs().max() <= bound and owned["head.bias"][2:].abs().max() <= bound


def test_a_grown_task_saves_loads_and_predicts_as_before(tmp_path) -> None:
    bank = _bank()
    before, predicted = _logits(bank, "t"), predict_labels(bank, "t", ROWS)
    bank.grow_labels("t", ["question"])
    with torch.no_grad():  # the new label out of reach: every prediction is an old one
        bank.heads["t"].bias[2] = -1e4
    grown = _logits(bank, "t")
    save_adapter(bank, "t", tmp_path / "adapter")
    loaded = MultiTaskModel(tiny_base("bert"))
    spec = load_adapter(loaded, tmp_path / "adapter")
    assert spec.labels == ["neg", "pos", "question"] and loaded.heads["t"].weight.shape[0] == 3
    assert torch.equal(_logits(loaded, "t"), grown)  # the same head: the same matmul
    assert torch.allclose(grown[:, :2], before, rtol=0, atol=1e-5)
    assert predict_labels(bank, "t", ROWS) == predict_labels(loaded, "t", ROWS) == predicted


def test_growing_one_task_leaves_the_banks_other_tasks_bit_identical() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("a", "classification", "lora", LoRAConfig(rank=4), ["neg", "pos"])
    bank.add_task("b", "classification", "prefix", None, ["x", "y", "z"])
    bank.add_task("g", "generation", "lora", LoRAConfig(rank=2))
    for seed, task in enumerate(bank.tasks):
        perturb(bank, task, seed)
    states = {t: bank.task_state_dict(t) for t in ("b", "g")}
    b_logits, g_logits = _logits(bank, "b"), _lm_logits(bank, "g")
    mixed = ROWS[:4]
    features = encode_task(bank, "a", mixed[:2], 64) + encode_task(bank, "b", mixed[2:], 64)
    batch = collate(features, 0, [0, 0, 1, 1])
    with torch.no_grad():
        mixed_before = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    bank.grow_labels("a", ["question", "more", "still"])
    assert torch.equal(_logits(bank, "b"), b_logits) and torch.equal(_lm_logits(bank, "g"), g_logits)
    for task, state in states.items():
        assert all(torch.equal(v, state[k]) for k, v in bank.task_state_dict(task).items())
    with torch.no_grad():
        mixed_after = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    assert mixed_after.shape == (4, 5)
    assert torch.equal(mixed_after[2:, :3], mixed_before[2:, :3]) and torch.isinf(mixed_after[2:, 3:]).all()
    assert torch.allclose(mixed_after[:2, :2], mixed_before[:2, :2], rtol=0, atol=1e-5)


def test_a_grown_task_trains_its_new_label() -> None:
    bank = _bank()
    bank.grow_labels("t", ["question"])
    questions = [Example(text=f"{w} is the movie", label="question") for w in ("what", "why", "how", "where")]
    data = toy_sentiment(24) + questions * 6
    cfg = TrainConfig(epochs=6, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    train(bank, "t", data, [], cfg, progress=False)
    assert predict_labels(bank, "t", [Example(text="who is the film")]) == ["question"]


def test_a_prompting_task_grows_its_label_list_only() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("p", "classification", "prompting", PromptingConfig(shots=0), ["neg", "pos"])
    assert _logits(bank, "p").shape == (len(ROWS), 2)
    bank.grow_labels("p", ["fine"])  # the prompt lists its labels, so old scores may change too
    assert bank.tasks["p"].labels == ["neg", "pos", "fine"] and not bank.task_parameters("p")
    after = _logits(bank, "p")
    assert after.shape == (len(ROWS), 3) and torch.isfinite(after).all()


def test_growing_refuses_a_generation_task_and_labels_already_there() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("t", "classification", "lora", None, ["neg", "pos"])
    bank.add_task("g", "generation", "lora")
    with pytest.raises(ConfigError, match="'g' generates text"):
        bank.grow_labels("g", ["x"])
    with pytest.raises(ConfigError, match=r"\['pos'\] are already in task 't'"):
        bank.grow_labels("t", ["new", "pos"])
    with pytest.raises(ConfigError, match=r"\['new'\] are already in task 't' or given twice"):
        bank.grow_labels("t", ["new", "new"])
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        bank.grow_labels("nope", ["x"])
    assert bank.tasks["t"].labels == ["neg", "pos"] and bank.heads["t"].weight.shape[0] == 2
