"""A method added from one file (tests/helpers/toy_method.py) is trained, mixed, compared and listed.

The registry is all a method needs: nothing in multitune names the toy method, yet ``multitune train`` takes
its flags, a bank mixes its rows with LoRA rows in one batch (each row equal to its task alone), compare
searches its registered space and reports it, and ``multitune methods`` lists it.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from helpers import save_tiny, tiny_base, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.config import TrainConfig
from multitune.methods import METHODS
from multitune.methods.lora import LoRAConfig
from multitune.training.evaluate import evaluate
from multitune.training.train import train


@pytest.fixture
def toy():
    """The toy method registered for one test, and gone after it (other tests count the registry)."""
    module = importlib.import_module("helpers.toy_method")
    if "toy" not in METHODS:  # imported by an earlier test: register it again
        importlib.reload(module)
    yield module
    METHODS.pop("toy", None)
    sys.modules.pop("helpers.toy_method", None)


def test_the_toy_method_trains_and_lowers_the_loss(toy) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("t", "classification", "toy", toy.ToyConfig(), ["neg", "pos"])
    assert all(k.endswith(".toy_bias") or k.startswith("head.") for k in bank.task_parameters("t"))
    data = toy_sentiment(48)
    before = evaluate(bank, "t", data)["loss"]
    train(
        bank,
        "t",
        data,
        data[:16],
        TrainConfig(epochs=6, batch_size=8, learning_rate=5e-2, patience=100),
        progress=False,
    )
    assert evaluate(bank, "t", data)["loss"] < 0.8 * before


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_toy_method_mixes_with_lora_rows_equal_to_each_alone(toy, family: str) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("toy", "classification", "toy", toy.ToyConfig(init=0.05), ["neg", "pos"])
    bank.add_task("lora", "classification", "lora", LoRAConfig(rank=2), ["a", "b", "c"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for task in bank.slots:
            for param in bank.task_parameters(task).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    texts = ["good movie", "the film was very bad", "what", "so happy"]
    tasks = ["toy", "lora", "lora", "toy"]
    enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mixed = bank.classify(
            enc.input_ids, enc.attention_mask, torch.tensor([bank.slots.index(t) for t in tasks])
        )
        for i, task in enumerate(tasks):
            one = bank.base.tokenizer([texts[i]], return_tensors="pt")
            alone = bank.classify(one.input_ids, one.attention_mask, bank.task_ids(task, 1))
            torch.testing.assert_close(mixed[i, : alone.shape[1]], alone[0], atol=1e-5, rtol=0)


def test_the_toy_method_is_compared_listed_and_has_its_flags(toy, tmp_path, capsys) -> None:
    from multitune.compare.run import compare
    from multitune.compare.settings import CompareConfig, default_methods
    from multitune.config import DataConfig

    assert "toy" in default_methods()
    assert main(["methods", "--no-model"]) == 0
    listed = capsys.readouterr().out
    assert "toy: a learned bias per task" in listed and "--toy-init" in listed
    model = save_tiny("bert", tmp_path / "bert")
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"{ex.text},{ex.label}\n" for ex in toy_sentiment(40)))
    assert (
        main(
            [
                "train",
                "--method",
                "toy",
                "--toy-init",
                "0.01",
                "--model",
                str(model),
                "--data",
                str(data),
                "--epochs",
                "1",
                "--output",
                str(tmp_path / "run"),
                "--quiet",
            ]
        )
        == 0
    )
    config = CompareConfig(
        model=str(model),
        methods=["toy"],
        trials=2,
        max_epochs=1,
        output=str(tmp_path / "cmp"),
        isolate=False,
        progress=False,
        data=DataConfig(data=str(data)),
        train=TrainConfig(batch_size=8),
    )
    lines: list[str] = []
    summary = compare(config, log=lines.append)
    (result,) = summary["results"]
    assert result["method"] == "toy" and "toy.init" in result["best_params"]
    assert any("toy trial 2/2: " in line for line in lines)
    assert "toy" in (tmp_path / "cmp" / "report.md").read_text()
