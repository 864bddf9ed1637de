"""EWC: the empirical Fisher diagonal, the penalty's formula (a grown head's old rows only), train(penalty=...)."""

from __future__ import annotations

import random

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
from multitune.training.evaluate import evaluate
from multitune.training.ewc import DEFAULT_STRENGTH, ewc_penalty, fisher_diagonal, row_losses
from multitune.training.train import train

DATA = toy_sentiment(10)


def _bank(family: str = "bert", kind: str = "classification") -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    labels = ["neg", "pos"] if kind == "classification" else None
    bank.add_task("t", kind, "lora", LoRAConfig(rank=4, dropout=0.1), labels)
    perturb(bank, "t", seed=1)
    return bank


def _by_hand(bank: MultiTaskModel, examples: list[Example]) -> dict[str, torch.Tensor]:
    """The definition: each example alone, its loss's gradient squared, averaged."""
    params = bank.task_parameters("t")
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    bank.eval()
    for example in examples:
        batch = collate(encode_task(bank, "t", [example], 64), 0, 0)
        grads = torch.autograd.grad(row_losses(bank, batch)[0], list(params.values()), allow_unused=True)
        for key, grad in zip(params, grads, strict=True):
            if grad is not None:
                total[key] += grad.pow(2)
    return {k: v / len(examples) for k, v in total.items()}


@pytest.mark.parametrize(
    ("family", "kind", "data"), [("bert", "classification", DATA), ("llama", "generation", None)]
)
def test_the_fisher_is_the_mean_squared_per_example_gradient(family: str, kind: str, data) -> None:
    bank = _bank(family, kind)
    examples = data or toy_generation(7)
    bank.train()
    fisher = fisher_diagonal(bank, "t", examples, 64, batch_size=3)  # batches of rows, one backward per row
    assert bank.training  # its mode is given back
    assert all(p.grad is None for p in bank.parameters())  # nothing accumulated anywhere
    assert set(fisher) == set(bank.task_parameters("t"))
    expected = _by_hand(bank, examples)
    for key, value in fisher.items():
        assert value.dtype == torch.float32 and value.shape == bank.task_parameters("t")[key].shape
        # float32 sums of squared gradients in another order: equal to 1e-4 of each tensor's largest entry
        scale = float(expected[key].abs().max())
        assert torch.allclose(value, expected[key], rtol=1e-4, atol=1e-4 * scale + 1e-12), key
    assert sum(float(v.sum()) for v in fisher.values()) > 0


def test_the_penalty_is_half_the_strength_times_the_normalised_fisher_weighted_distance() -> None:
    bank = _bank()
    anchor = bank.task_state_dict("t")
    fisher = fisher_diagonal(bank, "t", DATA, 64)
    penalty = ewc_penalty(bank, "t", anchor, fisher, strength=7.0)
    assert float(penalty().detach()) == 0.0  # at the anchor
    perturb(bank, "t", seed=2, scale=0.05)
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
    expected = sum(
        (fisher[k] / mean * (p.detach() - anchor[k]).pow(2)).sum()
        for k, p in bank.task_parameters("t").items()
    )
    value = penalty()
    assert value.requires_grad and torch.allclose(value.detach(), 3.5 * expected, rtol=1e-5)
    value.backward()  # d/dtheta = strength * Fhat * (theta - anchor)
    key = "head.weight"
    grad = 7.0 * fisher[key] / mean * (bank.task_parameters("t")[key].detach() - anchor[key])
    assert torch.allclose(bank.task_parameters("t")[key].grad, grad, rtol=1e-5, atol=1e-8)
    zero = ewc_penalty(bank, "t", anchor, fisher, strength=0.0)
    assert float(zero().detach()) == 0.0


def test_a_grown_head_is_anchored_on_its_old_rows_only() -> None:
    bank = _bank()
    anchor, fisher = bank.task_state_dict("t"), fisher_diagonal(bank, "t", DATA, 64)
    bank.grow_labels("t", ["question"])
    penalty = ewc_penalty(bank, "t", anchor, fisher)
    assert float(penalty().detach()) == 0.0
    head = bank.heads["t"]
    with torch.no_grad():
        head.weight[2] += 5.0
        head.bias[2] -= 5.0
    assert float(penalty().detach()) == 0.0  # the new label's row is free
    with torch.no_grad():
        head.weight[0] += 0.1
    assert float(penalty().detach()) > 0.0


def test_keys_outside_the_task_or_shapes_that_do_not_fit_are_refused() -> None:
    bank = _bank()
    anchor, fisher = bank.task_state_dict("t"), fisher_diagonal(bank, "t", DATA, 64)
    with pytest.raises(ConfigError, match="EWC strength must be 0 or more"):
        ewc_penalty(bank, "t", anchor, fisher, strength=-1.0)
    with pytest.raises(ConfigError, match="none of the parameters of task 't'"):
        ewc_penalty(bank, "t", {"x.weight": torch.zeros(1)}, {"x.weight": torch.zeros(1)})
    wrong = {**fisher, "head.weight": torch.ones(2, 5)}
    with pytest.raises(ConfigError, match=r"Fisher of 'head.weight' has shape \(2, 5\)"):
        ewc_penalty(bank, "t", anchor, wrong)
    with pytest.raises(ConfigError, match="labels outside its label set"):
        fisher_diagonal(bank, "t", [Example(text="good movie", label="question")], 64)
    with pytest.raises(ConfigError, match="needs examples"):
        fisher_diagonal(bank, "t", [], 64)


def test_a_task_without_parameters_has_no_fisher_and_no_penalty() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("p", "classification", "prompting", PromptingConfig(shots=0), ["neg", "pos"])
    assert fisher_diagonal(bank, "p", DATA, 64) == {}
    assert float(ewc_penalty(bank, "p", {}, {})().detach()) == 0.0


def _questions(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    filler = ["the", "a", "is", "was", "it", "this", "that", "movie", "film", "food"]
    words = ["what", "why", "how", "where", "who"]
    return [Example(text=" ".join(rng.sample(words, 2) + rng.sample(filler, 3)), label="q") for _ in range(n)]


def test_an_update_with_the_penalty_keeps_more_of_the_old_task_and_logs_it() -> None:
    """Class-incremental: neg/pos learnt, a question label added and trained on its own rows at LoRA's default
    rate; without EWC the old labels are forgotten, with the default strength part of them is kept."""
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("t", "classification", "lora", LoRAConfig(rank=4, dropout=0.0), ["neg", "pos"])
    old = toy_sentiment(96)
    cfg = TrainConfig(epochs=8, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    train(bank, "t", old[:64], old[:16], cfg, progress=False)
    anchor, fisher = bank.task_state_dict("t"), fisher_diagonal(bank, "t", old[:64], 64)
    bank.grow_labels("t", ["q"])
    grown = bank.task_state_dict("t")
    update = TrainConfig(epochs=5, batch_size=8, learning_rate=2e-3, warmup_ratio=0.0, patience=100)
    scores = {}
    for strength in (None, DEFAULT_STRENGTH):
        bank.load_task_state_dict("t", grown)
        penalty = None if strength is None else ewc_penalty(bank, "t", anchor, fisher, strength)
        result = train(bank, "t", _questions(48, 1), [], update, progress=False, penalty=penalty)
        assert ("penalty" in result.log[-1]) is (penalty is not None)
        scores[strength] = (
            evaluate(bank, "t", old[64:])["accuracy"],
            evaluate(bank, "t", _questions(32, 2))["accuracy"],
        )
    (old_naive, new_naive), (old_ewc, new_ewc) = scores[None], scores[DEFAULT_STRENGTH]
    assert old_naive <= 0.1 and new_naive >= 0.9
    assert old_ewc >= old_naive + 0.2 and new_ewc >= 0.6
