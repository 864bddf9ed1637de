"""Mixed batches under ``torch.inference_mode()``: what serving code and users wrap inference in.

Tensors made in inference mode have no version counter; the per-row caches of the method wrappers once keyed
on it and raised ``RuntimeError: Inference tensors do not track version counter`` for any mixed batch with a
LoRA or adapter task. Every method mixed must give, in inference mode, what it gives under ``no_grad``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import perturb, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.data import Example
from multitune.methods import get_method
from multitune.serve.engine import Engine

METHODS = ["base", "lora", "prompt", "prefix", "adapter", "ia3", "prompting"]
TEXTS = [
    "good movie",
    "the film was very bad and not nice",
    "what",
    "so happy and great",
    "it is",
    "not bad",
    "poor service",
]


def _bank(family: str, kind: str) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    for i, method in enumerate(METHODS):
        bank.add_task(method, kind, method, None, ["pos", "neg"] if kind == "classification" else None)
        fit = get_method(method).fit
        if fit is not None:
            fit(bank, method, toy_sentiment(8) if kind == "classification" else toy_generation(4))
        perturb(bank, method, i, scale=0.15)
    return bank


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
def test_every_method_mixed_classifies_alike_under_inference_mode(family: str) -> None:
    bank = _bank(family, "classification")
    enc = bank.base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        rows = torch.arange(len(METHODS))
        want = bank.classify(enc.input_ids, enc.attention_mask, rows)
    for _ in range(2):  # the second pass is served from the wrappers' caches
        with torch.inference_mode():
            rows = torch.arange(len(METHODS))
            got = bank.classify(enc.input_ids, enc.attention_mask, rows)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_engine_generates_every_method_mixed_under_inference_mode() -> None:
    bank = _bank("llama", "generation")
    engine = Engine(bank.base)
    engine.shared = bank
    requests = [(method, Example(text=text)) for method, text in zip(METHODS, TEXTS, strict=True)]
    want = engine.generate(requests, max_new_tokens=4)
    with torch.inference_mode():
        got = engine.generate(requests, max_new_tokens=4)
        again = engine.generate(requests, max_new_tokens=4)
    assert got == want == again


def test_a_routing_tensor_changed_in_place_under_inference_mode_is_rerouted() -> None:
    bank = _bank("llama", "classification")
    enc = bank.base.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    slots = [bank.slots.index(t) for t in ("lora", "adapter", "ia3")]
    with torch.inference_mode():
        rows = torch.tensor(slots)
        bank.classify(enc.input_ids, enc.attention_mask, rows)
        rows[0], rows[1] = slots[1], slots[0]  # the same tensor, rerouted in place
        swapped = bank.classify(enc.input_ids, enc.attention_mask, rows)
    with torch.no_grad():
        want = bank.classify(enc.input_ids, enc.attention_mask, torch.tensor([slots[1], slots[0], slots[2]]))
    torch.testing.assert_close(swapped, want, atol=1e-6, rtol=0)
