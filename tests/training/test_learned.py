"""Runs that did not learn are told apart (train's last line, result.json); learning-rate groups per parameter."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch
from helpers import tiny_base, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.methods.prefix import PrefixConfig
from multitune.training.learned import advice, cause_of, chance_loss, not_learned
from multitune.training.loop import HEAD_LEARNING_RATE, parameter_groups
from multitune.training.train import train


def _examples(labels: list[str]) -> list[Example]:
    return [Example(text=f"t{i}", label=label) for i, label in enumerate(labels)]


def test_the_chance_level_is_the_entropy_of_the_label_prior() -> None:
    assert chance_loss(["a", "b"] * 5) == pytest.approx(math.log(2))
    assert chance_loss(["a"] * 9 + ["b"]) == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    assert chance_loss(["a"] * 4) == 0.0


def test_one_label_for_everything_did_not_learn_even_with_a_good_looking_accuracy() -> None:
    validation = _examples(["ham"] * 87 + ["spam"] * 13)  # 0.87 by answering 'ham' every time
    history = [{"step": 10, "accuracy": 0.87, "loss": 0.2, "predicted_labels": 1.0}]
    reason = not_learned(history, 10, validation, validation)
    assert reason is not None and "one label for every validation example" in reason
    history[0]["predicted_labels"] = 2.0
    assert not_learned(history, 10, validation, validation) is None


def test_a_loss_that_never_left_the_chance_level_did_not_learn() -> None:
    validation = _examples(["neg", "pos"] * 20)
    at_chance = [
        {"step": s, "accuracy": 0.55, "loss": math.log(2) + 0.001, "predicted_labels": 2.0} for s in (5, 10)
    ]
    reason = not_learned(at_chance, 5, validation, validation)
    assert reason is not None and "chance level" in reason and "0.693" in reason
    learning = [*at_chance, {"step": 15, "accuracy": 0.8, "loss": 0.45, "predicted_labels": 2.0}]
    assert not_learned(learning, 15, validation, validation) is None


def test_without_validation_the_last_training_losses_are_judged() -> None:
    train_examples = _examples(["neg", "pos"] * 20)
    flat = [{"step": s, "loss": 0.70} for s in range(1, 21)]
    assert "training loss stayed at the chance level" in (
        not_learned([], None, [], train_examples, flat) or ""
    )
    falling = [{"step": s, "loss": 0.7 - 0.03 * s} for s in range(1, 21)]
    assert not_learned([], None, [], train_examples, falling) is None


def test_the_cause_is_read_from_the_curves_and_the_advice_moves_the_rate_its_way() -> None:
    # overshoot: the training loss climbed far above where it started, whatever validation did
    spiking = [{"step": s, "loss": 0.7 if s < 5 else 3.0} for s in range(1, 41)]
    falling_validation = [{"step": 20, "loss": 0.5}, {"step": 40, "loss": 0.3}]
    assert cause_of(falling_validation, spiking) == "overshoot"
    # slow: validation loss still falling at the last evaluation (SMS spam's adapter run at 1e-3: 0.30, 0.21, 0.18)
    falling = [{"step": s, "loss": 0.74 - 0.01 * s} for s in range(1, 61)]
    history = [{"step": 20, "loss": 0.301}, {"step": 40, "loss": 0.206}, {"step": 60, "loss": 0.182}]
    assert cause_of(history, falling) == "slow"
    assert cause_of([*history, {"step": 80, "loss": 0.25}], falling) == "overshoot"  # turned back up
    assert cause_of([], falling) == "slow"  # no validation: the training loss decides
    assert cause_of([], [{"step": 1, "loss": 0.7}]) == "overshoot"  # nothing to read: the usual cause
    slow = advice("adapter", None, 1e-3, True, "slow", 3)
    assert "too few updates" in slow and "--learning-rate 0.004" in slow and "--epochs 6" in slow
    fast = advice("adapter", None, 1e-3, True, "overshoot", 3)
    assert "overshoot" in fast and "--learning-rate 0.00025" in fast


def test_a_learning_run_has_no_problem() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("t", "classification", "lora", None, ["neg", "pos"])
    data = toy_sentiment(64)
    config = TrainConfig(epochs=6, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    result = train(bank, "t", data, data[:16], config, progress=False)
    assert result.problem is None


def _random_labels_csv(path, n: int = 64) -> str:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):  # labels carry nothing the text says: nobody can learn them
            writer.writerow([" ".join(rng.choices(words, k=5)), "neg" if i % 2 else "pos"])
    return str(path)


def test_train_says_on_its_last_line_and_in_result_json_that_a_run_did_not_learn(
    bert_dir, tmp_path, capsys
) -> None:
    data = _random_labels_csv(tmp_path / "noise.csv")
    out = tmp_path / "run"
    argv = ["train", "--model", str(bert_dir), "--data", data, "--output", str(out), "--method", "lora"]
    main([*argv, "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e-7", "--quiet"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("warning: task 'run' did not learn: ")
    assert "try --learning-rate" in last or "--epochs" in last
    result = json.loads((out / "result.json").read_text())
    assert result["learned"] is False and result["problem"] in last


def test_the_head_and_the_prefix_mlp_get_learning_rates_of_their_own() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("p", "classification", "prefix", PrefixConfig(num_virtual_tokens=4), ["a", "b"])
    keys = sorted(bank.task_parameters("p"))
    groups = dict(parameter_groups(bank, "p", keys, 1e-2, TrainConfig()))
    named = {id(p): k for k, p in bank.task_parameters("p").items()}
    by_rate = {rate: sorted(named[id(p)] for p in params) for rate, params in groups.items()}
    assert by_rate[1e-2] == ["head.bias", "head.weight", "prefix.embedding"]  # the head: max(lr, 1e-3)
    (mlp_rate,) = set(by_rate) - {1e-2}
    assert mlp_rate == pytest.approx(1e-3) and all(k.startswith("prefix.mlp.") for k in by_rate[mlp_rate])
    assert sum(len(v) for v in by_rate.values()) == len(keys)
    # The head: at least HEAD_LEARNING_RATE by default, exactly --head-learning-rate when given.
    bank.add_task("l", "classification", "lora", None, ["a", "b"])
    lora_keys = sorted(bank.task_parameters("l"))
    low = dict(parameter_groups(bank, "l", lora_keys, 1e-5, TrainConfig()))
    assert HEAD_LEARNING_RATE in low and 1e-5 in low
    given = dict(parameter_groups(bank, "l", lora_keys, 1e-5, TrainConfig(head_learning_rate=0.02)))
    heads = {id(p) for k, p in bank.task_parameters("l").items() if k.startswith("head.")}
    assert {id(p) for p in given[0.02]} == heads


def test_a_bad_head_learning_rate_is_one_line_naming_the_flag(bert_dir, tmp_path, capsys) -> None:
    data = _random_labels_csv(tmp_path / "d.csv")
    argv = ["train", "--model", str(bert_dir), "--data", data, "--output", str(tmp_path / "r")]
    assert main([*argv, "--head-learning-rate", "0"]) == 2
    assert not (tmp_path / "r").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--head-learning-rate" in err
