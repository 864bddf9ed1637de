"""--gradient-checkpointing: the same loss and gradients as without, less saved activation memory."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, perturb, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.encode import collate, encode_task
from multitune.training.checkpointing import blocks, checkpointed
from multitune.training.train import train

METHODS = ["lora", "ia3", "adapter", "prompt", "prefix"]


def _bank(family: str, kind: str) -> MultiTaskModel:
    """Two tasks of every method but one: a mixed batch with rows of each (and rows of a LoRA task)."""
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    labels = ["neg", "pos"] if kind == "classification" else None
    for i, method in enumerate(METHODS):
        bank.add_task(method, kind, method, None, labels)
        perturb(bank, method, seed=i, scale=0.1)
    return bank


def _batch(bank: MultiTaskModel, kind: str) -> dict[str, torch.Tensor]:
    data = toy_sentiment(10) if kind == "classification" else toy_generation(10)
    features, slots = [], []
    for i, method in enumerate(METHODS):
        rows = encode_task(bank, method, data[2 * i : 2 * i + 2], 32)
        features += rows
        slots += bank.task_ids(method, len(rows)).tolist()
    return collate(features, bank.base.tokenizer.pad_token_id, slots)


def _loss_and_gradients(
    bank: MultiTaskModel, batch: dict[str, torch.Tensor], on: bool
) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes the autograd graph kept for the backward pass."""
    bank.train()
    bank.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)  # dropout draws the same numbers both times
    with checkpointed(bank, on), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = bank(batch)
    loss.backward()
    grads = {
        f"{t}/{k}": p.grad.clone()
        for t in bank.tasks
        for k, p in bank.task_parameters(t).items()
        if p.grad is not None
    }
    return loss.item(), grads, saved[0]


@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_blocks_give_the_same_loss_and_gradients_for_every_method_mixed(
    family: str, kind: str
) -> None:
    if kind == "generation" and family == "bert":
        pytest.skip("an encoder has no generation tasks")
    bank = _bank(family, kind)
    batch = _batch(bank, kind)
    assert batch["task_ids"].unique().numel() == len(METHODS)
    loss, grads, saved = _loss_and_gradients(bank, batch, on=False)
    loss_cp, grads_cp, saved_cp = _loss_and_gradients(bank, batch, on=True)
    assert loss_cp == pytest.approx(loss, abs=1e-6)
    assert grads_cp.keys() == grads.keys()
    # every method's tensors got a gradient (the recomputed blocks saw the rows' tasks and the prefixes)
    assert {k.split("/")[0] for k in grads} == set(METHODS)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_cp[key], grad, atol=1e-5, rtol=0, msg=key)
    assert saved_cp < saved  # the blocks' intermediates were not kept
    assert not any("forward" in vars(b) for b in blocks(bank))  # the blocks are themselves again


def test_without_routing_in_the_backward_the_recompute_would_be_wrong() -> None:
    """The guard above is not vacuous: a naive checkpoint (no routing restored) changes the gradients."""
    from torch.utils.checkpoint import checkpoint

    bank = _bank("llama", "classification")
    batch = _batch(bank, "classification")
    _, grads, _ = _loss_and_gradients(bank, batch, on=False)
    originals = {}
    for block in blocks(bank):
        originals[block] = block.forward
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)
    try:
        with pytest.raises(Exception):  # noqa: B017 (the recompute fails or differs)
            _, naive, _ = _loss_and_gradients(bank, batch, on=False)
            for key, grad in grads.items():
                torch.testing.assert_close(naive[key], grad, atol=1e-5, rtol=0)
    finally:
        for block in originals:
            del block.forward


def test_train_with_gradient_checkpointing_equals_train_without(tmp_path) -> None:
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        bank = MultiTaskModel(tiny_base("llama"))
        bank.add_task("t", "classification", "lora", None, ["neg", "pos"])
        data = toy_sentiment(32)
        config = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-2, gradient_checkpointing=on)
        train(bank, "t", data[:24], data[24:], config, progress=False)
        results.append(bank.task_state_dict("t"))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, atol=1e-5, rtol=0, msg=key)
