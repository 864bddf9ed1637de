"""The ``pooled_out`` hook of ``MultiTaskModel.classify``: the features drift monitoring reads are exactly the
vectors the heads read, from the same forward, for mixed batches of tasks that pool differently."""

from __future__ import annotations

import torch
from helpers import perturb, tiny_base, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.methods import get_method
from multitune.methods.lora import LoRAConfig

TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy and great", "it is", "poor"]


def _bank(with_prompting: bool = False) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("a", "classification", "lora", LoRAConfig(rank=2), ["neg", "pos"], pooling="mean")
    bank.add_task("b", "classification", "lora", LoRAConfig(rank=4), ["x", "y", "z"], pooling="cls")
    perturb(bank, "a", 1)
    perturb(bank, "b", 2)
    if with_prompting:
        bank.add_task("p", "classification", "prompting", None, ["neg", "pos"])
        fit = get_method("prompting").fit
        assert fit is not None
        fit(bank, "p", toy_sentiment(16))
    return bank


def _run(bank: MultiTaskModel, tasks: list[str], pooled: list | None):
    enc = bank.base.tokenizer(TEXTS[: len(tasks)], padding=True, return_tensors="pt")
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    with torch.no_grad():
        return bank.classify(enc.input_ids, enc.attention_mask, rows, pooled_out=pooled)


def test_pooled_rows_are_what_each_head_read_in_a_mixed_batch() -> None:
    bank = _bank()
    tasks = ["a", "b", "a", "b", "b", "a"]
    pooled: list = []
    logits = _run(bank, tasks, pooled)
    assert len(pooled) == 1 and pooled[0].shape == (6, 32) and pooled[0].dtype == torch.float32
    for i, task in enumerate(tasks):
        head = bank.heads[task]
        width = head.out_features
        with torch.no_grad():
            torch.testing.assert_close(head(pooled[0][i]), logits[i, :width], atol=1e-5, rtol=0)
    # the two poolings differ, so a wrong pooling for one task would not pass the head check above
    alone: list = []
    _run(bank, ["a"], alone)
    torch.testing.assert_close(pooled[0][0:1], alone[0], atol=1e-5, rtol=0)


def test_without_the_list_nothing_changes_and_logits_equal() -> None:
    bank = _bank()
    tasks = ["a", "b", "a"]
    pooled: list = []
    torch.testing.assert_close(_run(bank, tasks, None), _run(bank, tasks, pooled))


def test_rows_scored_by_their_method_are_nan_and_all_scored_gives_none() -> None:
    bank = _bank(with_prompting=True)
    tasks = ["p", "a", "p", "b"]
    pooled: list = []
    logits = _run(bank, tasks, pooled)
    features = pooled[0]
    assert features.shape == (4, 32)
    assert torch.isnan(features[[0, 2]]).all() and not torch.isnan(features[[1, 3]]).any()
    with torch.no_grad():
        torch.testing.assert_close(bank.heads["a"](features[1]), logits[1, :2], atol=1e-5, rtol=0)
    only: list = []
    _run(bank, ["p", "p"], only)
    assert only == [None]
