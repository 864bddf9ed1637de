"""The method x model-family matrix: every trainable method on every family.

For each pair: forward and backward reach exactly the method's own parameters, 30 optimizer steps lower
the loss of a learnable toy task, the frozen base is untouched, and a save/load round trip gives the same
outputs. Method-specific behaviour (parity with peft, mixed batches, folding) lives in each method's tests.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, tiny_base, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.compare.catalog import method_facts
from multitune.config import TrainConfig
from multitune.methods import METHODS
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate, predict_proba
from multitune.training.train import train

# Every registered method with something to train, on every family. The toy task's learning rate: the
# method's default times ten (the tiny models learn in 30 steps), but for those whose default suits them.
TRAINABLE = sorted(name for name, method in METHODS.items() if method.fit is None)
LEARNING_RATES = {"base": 5e-2, "lora": 1e-2, "prompt": 5e-2, "prefix": 1e-2, "ia3": 5e-2, "full": 1e-3}
MATRIX = [(m, f) for m in TRAINABLE for f in FAMILIES]


def _learning_rate(method: str) -> float:
    return LEARNING_RATES.get(method, 10 * METHODS[method].default_learning_rate)


def test_the_matrix_covers_every_registered_trainable_method() -> None:
    assert {"base", "lora", "prompt", "prefix", "adapter", "ia3", "full"} <= set(TRAINABLE)


@pytest.mark.parametrize(("method", "family"), MATRIX)
def test_method_on_family(method: str, family: str, tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_base(family)
    frozen = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    bank = MultiTaskModel(base)
    bank.add_task("t", "classification", method, None, ["neg", "pos"])
    own = bank.task_parameters("t")

    # exactly the method's own parameters are trainable
    trainable = {id(p) for p in bank.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in own.values()}

    # forward and backward reach every one of them
    data = toy_sentiment(64)
    batch = bank.base.tokenizer([ex.text for ex in data[:8]], padding=True, return_tensors="pt")
    labels = torch.tensor([0 if ex.label == "neg" else 1 for ex in data[:8]])
    bank.train()
    loss = bank(
        {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "task_ids": bank.task_ids("t", 8),
            "class_labels": labels,
        }
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in own.values())
    bank.zero_grad(set_to_none=True)

    # 30 steps lower the loss
    before = evaluate(bank, "t", data)["loss"]
    cfg = TrainConfig(
        max_steps=30,
        epochs=100,
        batch_size=8,
        learning_rate=_learning_rate(method),
        warmup_ratio=0.0,
        patience=1000,
        eval_every=1000,
    )
    result = train(bank, "t", data, data[:8], cfg, progress=False)
    assert result.steps == 30
    after = evaluate(bank, "t", data)["loss"]
    assert after < 0.9 * before, (before, after)

    # the base is untouched (full fine-tuning owns it: it is the exception)
    if method != "full":
        for name, param in base.model.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name]), name

    # save and load give the same outputs
    want = predict_proba(bank, "t", data[:16])
    save_adapter(bank, "t", tmp_path / "adapter")
    other = MultiTaskModel(tiny_base(family))
    load_adapter(other, tmp_path / "adapter")
    torch.testing.assert_close(predict_proba(other, "t", data[:16]), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_catalog_counts_equal_the_parameters_a_task_gets(family: str) -> None:
    base = tiny_base(family)
    facts = {f.name: f for f in method_facts(base, "classification", 3)}
    for name in TRAINABLE:
        bank = MultiTaskModel(base)
        bank.add_task("t", "classification", name, None, ["a", "b", "c"])
        assert facts[name].trainable == sum(p.numel() for p in bank.task_parameters("t").values()), name
        bank.remove_task("t")
    assert facts["prefix"].stored < facts["prefix"].trainable  # the MLP is folded away before saving
    assert facts["full"].trainable > max(f.trainable for n, f in facts.items() if n != "full" and f.trainable)
    assert not any(p.requires_grad for p in base.model.parameters())  # the probes left nothing behind
