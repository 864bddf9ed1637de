"""The engine: tasks of every method, fully fine-tuned ones included, behind one classify/generate."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.methods.prefix import PrefixConfig
from multitune.methods.prompt import PromptConfig
from multitune.methods.prompting import PromptingConfig
from multitune.models import load_base
from multitune.serve.engine import Engine
from multitune.storage import save_adapter
from multitune.training.evaluate import generate_texts, predict_proba

GENERATION = {
    "g-lora": ("lora", None),
    "g-prompt": ("prompt", PromptConfig(num_virtual_tokens=4, init="random")),
    "g-prefix": ("prefix", PrefixConfig(num_virtual_tokens=3)),
    "g-adapter": ("adapter", None),
    "g-ia3": ("ia3", None),
    "g-prompting": ("prompting", PromptingConfig(shots=1)),
    "g-full": ("full", None),
}
CLASSIFICATION = {
    "c-lora": ("lora", None),
    "c-prefix": ("prefix", None),
    "c-base": ("base", None),
    "c-prompting": ("prompting", None),
    "c-full": ("full", None),
}


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    """A bank folder with one adapter per task, trained-looking (perturbed) weights, on a saved tiny llama."""
    root = tmp_path_factory.mktemp("engine")
    save_tiny("llama", root / "model")
    generator = torch.Generator().manual_seed(0)
    for name, (method, config) in {**GENERATION, **CLASSIFICATION}.items():
        bank = MultiTaskModel(load_base(str(root / "model"), device="cpu"))
        kind = "generation" if name.startswith("g-") else "classification"
        labels = None if kind == "generation" else ["neg", "pos"]
        bank.add_task(name, kind, method, config, labels)
        fit = get_method(method).fit
        if fit is not None:
            fit(bank, name, toy_generation(8) if kind == "generation" else toy_sentiment(8))
        with torch.no_grad():
            for param in bank.task_parameters(name).values():
                param.add_(
                    torch.randn(param.shape, generator=generator) * (0.02 if method == "full" else 0.3)
                )
        fold = get_method(method).fold
        if fold is not None:
            fold(bank, name)
        save_adapter(bank, name, root / "bank" / name)
    return root / "bank"


@pytest.fixture(scope="module")
def engine(bank_dir) -> Engine:
    return Engine.from_folder(bank_dir)


def test_fully_fine_tuned_tasks_get_groups_of_their_own(engine) -> None:
    assert set(engine.groups) == {"g-full", "c-full"}
    assert set(engine.tasks) == set(GENERATION) | set(CLASSIFICATION)
    assert engine.bank_of("g-full").base.model is not engine.shared.base.model
    assert engine.bank_of("g-lora") is engine.shared


def test_mixed_generation_requests_equal_each_task_alone(engine) -> None:
    prompts = [ex.text for ex in toy_generation(len(GENERATION) * 2, seed=7)]
    requests = [(task, prompts[i]) for i, task in enumerate(list(GENERATION) * 2)]
    got = engine.generate(requests, max_new_tokens=5)
    for (task, prompt), text in zip(requests, got, strict=True):
        alone = generate_texts(
            engine.bank_of(task), task, [type(toy_generation(1)[0])(text=prompt)], max_new_tokens=5
        )
        assert text == alone[0], task
    assert len(set(got)) > 1


def test_mixed_classification_requests_equal_each_task_alone(engine) -> None:
    texts = [ex.text for ex in toy_sentiment(len(CLASSIFICATION) * 2, seed=9)]
    requests = [(task, texts[i]) for i, task in enumerate(list(CLASSIFICATION) * 2)]
    got = engine.classify(requests)
    for (task, text), probs in zip(requests, got, strict=True):
        bank = engine.bank_of(task)
        alone = predict_proba(bank, task, [type(toy_sentiment(1)[0])(text=text)])[0]
        assert list(probs) == bank.tasks[task].labels
        torch.testing.assert_close(torch.tensor(list(probs.values())), alone, atol=1e-5, rtol=0)


def test_tasks_come_and_go_without_touching_the_others(engine, bank_dir) -> None:
    requests = [("g-lora", "the movie was good"), ("g-prefix", "the movie was bad")]
    before = engine.generate(requests, max_new_tokens=4)
    engine.load(bank_dir / "g-prompt", name="extra")
    engine.load(bank_dir / "c-full", name="extra-full")
    assert engine.generate(requests, max_new_tokens=4) == before
    engine.remove("extra")
    engine.remove("extra-full")
    assert "extra" not in engine.tasks and "extra-full" not in engine.groups
    assert engine.generate(requests, max_new_tokens=4) == before


def test_bad_requests_give_clear_errors(engine, bank_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        engine.generate([("nope", "hi")])
    with pytest.raises(ConfigError, match="is a classification task, not generation"):
        engine.generate([("c-lora", "hi")])
    with pytest.raises(ConfigError, match="already served"):
        engine.load(bank_dir / "g-lora")
    with pytest.raises(ConfigError, match="unknown task"):
        engine.remove("nope")
    with pytest.raises(ConfigError, match="holds no adapter folders"):
        Engine.from_folder(tmp_path)
