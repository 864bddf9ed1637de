"""Multi-task training from mixed batches: sampling, per-task gradients, learning, early stopping, the CLI."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    NEGATIVE,
    POSITIVE,
    WORDS,
    tiny_base,
    toy_generation,
    toy_sentiment,
)

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.config import DataConfig, TrainConfig
from multitune.data import Example
from multitune.encode import encode_task
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate, predict_proba
from multitune.training.multitask import RowSampler, mixed_loss, task_probabilities, train_multitask
from multitune.training.train import train

TRAINED = ["lora", "prompt", "prefix", "adapter", "ia3"]
QUESTION = ["what", "why", "how", "where", "who"]
NEUTRAL = [w for w in WORDS[13:] if w not in QUESTION]


def toy_three(n: int = 60, seed: int = 0) -> list[Example]:
    """Three labels: positive words, negative words, or question words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ("pos", "neg", "question")[i % 3]
        pool = {"pos": POSITIVE, "neg": NEGATIVE, "question": QUESTION}[label]
        words = rng.sample(pool, 2) + rng.sample(NEUTRAL, 3)
        rng.shuffle(words)
        out.append(Example(text=" ".join(words), label=label))
    return out


# ---- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ("proportional", [100 / 1000, 300 / 1000, 600 / 1000]),
        (
            "temperature",
            [
                10 / (10 + 300**0.5 + 600**0.5),
                300**0.5 / (10 + 300**0.5 + 600**0.5),
                600**0.5 / (10 + 300**0.5 + 600**0.5),
            ],
        ),
    ],
)
def test_row_tasks_follow_the_mixing_formula_on_a_long_draw(sampling: str, expected: list[float]) -> None:
    sizes = [100, 300, 600]
    probabilities = task_probabilities(sizes, sampling, temperature=2.0)
    torch.testing.assert_close(torch.tensor(probabilities), torch.tensor(expected), atol=1e-12, rtol=0)
    sampler = RowSampler(sizes, probabilities, seed=0)
    rows = [r for _ in range(500) for r in sampler.draw(40)]
    counts = Counter(t for t, _ in rows)
    observed = [counts[i] / len(rows) for i in range(3)]
    # 20,000 rows: the standard error of each share is below 0.004; the two formulas differ by over 0.08
    assert max(abs(o - e) for o, e in zip(observed, expected, strict=True)) < 0.012, observed


def test_temperature_one_is_proportional_and_large_temperatures_approach_uniform() -> None:
    sizes = [10, 90]
    assert task_probabilities(sizes, "temperature", 1.0) == pytest.approx(
        task_probabilities(sizes, "proportional")
    )
    assert task_probabilities(sizes, "temperature", 1000.0) == pytest.approx([0.5, 0.5], abs=1e-3)
    with pytest.raises(ConfigError, match="temperature"):
        task_probabilities(sizes, "temperature", 0.0)
    with pytest.raises(ConfigError, match="sampling"):
        task_probabilities(sizes, "uniform")


def test_each_task_yields_its_examples_in_epochs_deterministically() -> None:
    sizes = [7, 13]
    first = RowSampler(sizes, [0.5, 0.5], seed=3)
    rows = [r for _ in range(50) for r in first.draw(8)]
    for task, n in enumerate(sizes):
        drawn = [i for t, i in rows if t == task]
        for start in range(0, len(drawn) - n + 1, n):  # every full epoch is a permutation of the task's data
            assert sorted(drawn[start : start + n]) == list(range(n))
        assert drawn[:n] != drawn[n : 2 * n]  # and the next epoch is another order
    again = RowSampler(sizes, [0.5, 0.5], seed=3)
    assert [r for _ in range(50) for r in again.draw(8)] == rows
    other = RowSampler(sizes, [0.5, 0.5], seed=4)
    assert [r for _ in range(50) for r in other.draw(8)] != rows


def test_inactive_tasks_get_no_rows() -> None:
    sampler = RowSampler([10, 10, 10], [0.2, 0.3, 0.5], seed=0)
    assert {t for t, _ in sampler.draw(200, active=[True, False, True])} == {0, 2}


# ---- per-task gradients from one mixed batch ------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
@pytest.mark.parametrize("method", TRAINED)
def test_each_task_gets_gradient_from_its_own_rows_only(method: str, family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    kinds = ["classification"] if family == "bert" else ["classification", "generation"]
    tasks = []
    for i, m in enumerate(TRAINED):
        for kind in kinds:
            labels = (
                (["neg", "pos"] if i % 2 else ["neg", "pos", "question"])
                if kind == "classification"
                else None
            )
            bank.add_task(
                f"{m}-{kind[:3]}", kind, m, LoRAConfig(dropout=0.0) if m == "lora" else None, labels
            )
            tasks.append(f"{m}-{kind[:3]}")
    with torch.no_grad():  # move off the initialisation (LoRA's B = 0 gives A no gradient)
        for task in tasks:
            for p in bank.task_parameters(task).values():
                p.add_(0.05 * torch.randn_like(p))
    data = {"classification": toy_sentiment(6) + toy_three(6), "generation": toy_generation(4)}
    features = {t: encode_task(bank, t, data[bank.tasks[t].kind], 32)[:3] for t in tasks}

    def gradients(rows_of: list[str]) -> dict[str, dict[str, torch.Tensor | None]]:
        bank.zero_grad(set_to_none=True)
        rows = [(t, f) for t in rows_of for f in features[t]]
        random.Random(0).shuffle(rows)  # tasks interleaved in the batch
        loss = mixed_loss(bank, [f for _, f in rows], [bank.slots.index(t) for t, _ in rows], reduction="sum")
        loss.backward()
        return {
            t: {k: None if p.grad is None else p.grad.clone() for k, p in bank.task_parameters(t).items()}
            for t in tasks
        }

    mixed = gradients(tasks)
    for task in [t for t in tasks if t.startswith(method)]:
        alone = gradients([task])
        assert all(g is not None for g in alone[task].values()), task
        # nonzero as a whole (T5 classification reads one decoder step: its decoder queries get none)
        assert sum(float(g.abs().sum()) for g in alone[task].values()) > 0, task
        for key, grad in alone[task].items():
            torch.testing.assert_close(mixed[task][key], grad, atol=1e-5, rtol=1e-4)
        for other in tasks:  # A's rows alone send nothing to any other task
            if other != task:
                assert all(g is None or not g.any() for g in alone[other].values()), other


def test_the_batch_loss_is_the_mean_over_rows_of_both_kinds() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("c", "classification", "lora", LoRAConfig(dropout=0.0), ["neg", "pos"])
    bank.add_task("g", "generation", "lora", LoRAConfig(dropout=0.0))
    fc = encode_task(bank, "c", toy_sentiment(3), 32)
    fg = encode_task(bank, "g", toy_generation(2), 32)
    slots = [0, 0, 0, 1, 1]
    with torch.no_grad():
        mean = mixed_loss(bank, fc + fg, slots)
        ce = mixed_loss(bank, fc, [0, 0, 0], reduction="sum")
        gen = mixed_loss(bank, fg, [1, 1])  # generation alone: token-mean NLL, as train() computes it
        summed = mixed_loss(bank, fc + fg, slots, reduction="sum")
    torch.testing.assert_close(mean, (ce + 2 * gen) / 5, atol=1e-5, rtol=0)
    assert summed > mean


# ---- training --------------------------------------------------------------------------------------
RUN_TASKS = {  # name: (method, kind, labels, learning rate)
    "sentiment": ("lora", "classification", ["neg", "pos"], 1e-2),
    "three": ("ia3", "classification", ["neg", "pos", "question"], 5e-2),
    "polarity": ("prompt", "classification", ["neg", "pos"], 5e-2),
    "reply": ("prefix", "generation", None, 1e-2),
    "zero-shot": ("prompting", "classification", ["neg", "pos"], None),
}


def _run_data() -> dict[str, tuple[list[Example], list[Example]]]:
    """Train and validation examples; tiny random models overfit, so validation is a part of train."""
    train = {
        "sentiment": toy_sentiment(48),
        "three": toy_three(48),
        "polarity": toy_sentiment(32, seed=2),
        "reply": toy_generation(32),
        "zero-shot": toy_sentiment(8, seed=4),
    }
    return {t: (examples, examples[:16]) for t, examples in train.items()}


def _run_bank(seed: int = 0, lora_dropout: float = 0.0) -> MultiTaskModel:
    torch.manual_seed(seed)
    bank = MultiTaskModel(tiny_base("llama"))
    for name, (method, kind, labels, _) in RUN_TASKS.items():
        config = LoRAConfig(rank=4, dropout=lora_dropout) if method == "lora" else None
        bank.add_task(name, kind, method, config, labels)
    return bank


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    bank = _run_bank()
    data = _run_data()
    before = {t: evaluate(bank, t, val, generate=False)["loss"] for t, (_, val) in data.items()}
    cfg = TrainConfig(epochs=6, batch_size=8, warmup_ratio=0.0, patience=100, metric="loss")
    run_dir = tmp_path_factory.mktemp("multi")
    rates = {t: lr for t, (_, _, _, lr) in RUN_TASKS.items() if lr is not None}
    results = train_multitask(bank, data, cfg, run_dir=run_dir, progress=False, learning_rates=rates)
    return bank, data, before, results, run_dir


def test_training_together_lowers_every_validation_loss(trained) -> None:
    bank, data, before, results, run_dir = trained
    assert list(results) == list(RUN_TASKS)
    for task in ("sentiment", "three", "polarity", "reply"):
        after = evaluate(bank, task, data[task][1], generate=False)["loss"]
        assert after < 0.8 * before[task], (task, before[task], after)
        assert (
            results[task].steps == 6 * 20
        )  # 160 examples (the fitted task's not counted) / 8 rows per epoch
    assert evaluate(bank, "three", data["three"][1])["accuracy"] > 0.6  # 3 labels: chance is 1/3
    # the prompting task is fitted, not trained: scored once, at step 0
    assert results["zero-shot"].steps == 0 and len(results["zero-shot"].history) == 1
    # prefix tuning's fold hook ran: the MLP became plain prefixes
    assert set(bank.task_parameters("reply")) == {"prefix.embeddings"}


def test_metrics_file_has_one_line_per_evaluation_and_task(trained) -> None:
    _, _, _, results, run_dir = trained
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained_tasks = ["sentiment", "three", "polarity", "reply"]
    assert [(r["task"], r["step"]) for r in lines] == [("zero-shot", 0)] + [
        (t, step) for step in range(20, 6 * 20 + 1, 20) for t in trained_tasks
    ]
    for task in trained_tasks:
        mine = [r for r in lines if r["task"] == task]
        assert results[task].best_metric == pytest.approx(min(r["loss"] for r in mine))
        assert results[task].metric == "loss"


def test_each_task_saved_alone_loads_back_with_the_same_outputs(trained, tmp_path) -> None:
    bank, data, _, _, _ = trained
    other = MultiTaskModel(tiny_base("llama"))
    for task in RUN_TASKS:
        save_adapter(bank, task, tmp_path / task)
        load_adapter(other, tmp_path / task)
    for task, (_, kind, _, _) in RUN_TASKS.items():
        examples = data[task][1]
        if kind == "classification":
            torch.testing.assert_close(
                predict_proba(other, task, examples), predict_proba(bank, task, examples), atol=1e-5, rtol=0
            )
        else:
            assert evaluate(other, task, examples, generate=False)["loss"] == pytest.approx(
                evaluate(bank, task, examples, generate=False)["loss"], abs=1e-5
            )


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_one_task_trained_from_mixed_batches_is_train(method: str) -> None:
    """With one task the sampler gives train()'s batches, so the runs end with the same weights (on llama:
    the tiny model without dropout, whose masks would come from different RNG streams)."""
    data = toy_sentiment(32)
    cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2, eval_every=2, patience=100, seed=2)
    banks = []
    for _ in range(2):
        torch.manual_seed(0)
        bank = MultiTaskModel(tiny_base("llama"))
        bank.add_task(
            "t",
            "classification",
            method,
            LoRAConfig(rank=4, dropout=0.0) if method == "lora" else None,
            ["neg", "pos"],
        )
        banks.append(bank)
    single = train(banks[0], "t", data, data[:8], cfg, progress=False)
    multi = train_multitask(banks[1], {"t": (data, data[:8])}, cfg, progress=False)["t"]
    assert multi.steps == single.steps == 12 and multi.best_step == single.best_step
    want, got = banks[0].task_state_dict("t"), banks[1].task_state_dict("t")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)


def _small_run(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    bank = _run_bank(lora_dropout=0.2)  # dropout: the run's RNG must come from its seed
    data = {t: d for t, d in _run_data().items() if t in ("sentiment", "three", "reply")}
    cfg = TrainConfig(epochs=1, max_steps=6, batch_size=6, learning_rate=1e-2, seed=seed, eval_every=3)
    torch.manual_seed(seed + 99)  # the caller's RNG state must not matter
    train_multitask(bank, data, cfg, sampling="temperature", progress=False)
    return {t: bank.task_state_dict(t) for t in data}


def test_the_same_seed_gives_the_same_weights() -> None:
    first, second, other = _small_run(5), _small_run(5), _small_run(6)
    for task in first:
        for key in first[task]:
            torch.testing.assert_close(second[task][key], first[task][key], atol=0, rtol=0)
    assert any(not torch.equal(other[t][k], first[t][k]) for t in first for k in first[t])


def test_a_task_that_stops_improving_is_frozen_while_the_others_go_on() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("bert"))
    for (
        module
    ) in bank.base.model.modules():  # with patience 2, the base's dropout noise alone can stall a task
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    # q/v only: on every linear layer (BERT's default targets) the tiny model overshoots at this rate
    good = LoRAConfig(rank=4, dropout=0.0, target_modules=["query", "value"])
    bank.add_task("good", "classification", "lora", good, ["neg", "pos"])
    bank.add_task("flipped", "classification", "adapter", None, ["neg", "pos"])
    train_data = toy_sentiment(48)
    flipped = [
        Example(ex.text, label="pos" if ex.label == "neg" else "neg") for ex in toy_sentiment(16, seed=1)
    ]
    # 'flipped' validates on inverted labels: the better it learns, the worse its validation loss
    data = {"good": (train_data, toy_sentiment(16, seed=1)), "flipped": (train_data, flipped)}
    cfg = TrainConfig(
        epochs=100,
        max_steps=40,
        batch_size=8,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        eval_every=2,
        patience=2,
        metric="loss",
    )
    snapshots: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def snapshot(step: int) -> None:
        snapshots[step] = {t: bank.task_state_dict(t) for t in data}

    results = train_multitask(bank, data, cfg, progress=False, on_step=snapshot)
    stop = results["flipped"].steps
    assert results["flipped"].stopped_early and not results["good"].stopped_early
    assert 2 <= stop < 40 and results["good"].steps == 40
    for step in range(stop, 41):  # after its freeze the task's weights never change ...
        for key, value in snapshots[stop]["flipped"].items():
            torch.testing.assert_close(snapshots[step]["flipped"][key], value, atol=0, rtol=0)
    changed = [k for k, v in snapshots[40]["good"].items() if not torch.equal(v, snapshots[stop]["good"][k])]
    assert changed  # ... while the other task's go on
    assert len(results["flipped"].history) == stop // 2 and len(results["good"].history) == 20
    # at the end each task holds its best weights
    assert evaluate(bank, "flipped", flipped)["loss"] == pytest.approx(
        results["flipped"].best_metric, rel=1e-5
    )


def test_full_fine_tuning_and_unknown_tasks_are_refused() -> None:
    data = (toy_sentiment(8), toy_sentiment(4))
    alone = MultiTaskModel(tiny_base("bert"))
    alone.add_task("f", "classification", "full", None, ["neg", "pos"])
    with pytest.raises(ConfigError, match="full fine-tuning, which owns the base"):
        train_multitask(alone, {"f": data}, TrainConfig(), progress=False)
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("a", "classification", "lora", None, ["neg", "pos"])
    with pytest.raises(ConfigError, match="task 'b' is not in the bank"):
        train_multitask(bank, {"a": data, "b": data}, TrainConfig(), progress=False)
    with pytest.raises(ConfigError, match="no tasks"):
        train_multitask(bank, {}, TrainConfig(), progress=False)
    with pytest.raises(ConfigError, match="sampling"):
        train_multitask(bank, {"a": data}, TrainConfig(), sampling="uniform", progress=False)


# ---- the CLI -------------------------------------------------------------------------------------------
def _write_csv(path, examples) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([(ex.text, ex.label) for ex in examples])
    return str(path)


@pytest.fixture
def multi_yaml(llama_dir, tmp_path):
    def write(tasks: list[dict] | None = None, **shared) -> str:
        sentiment = _write_csv(tmp_path / "sentiment.csv", toy_sentiment(80))
        three = _write_csv(tmp_path / "three.csv", toy_three(90))
        gen = tmp_path / "gen.jsonl"
        gen.write_text(
            "".join(
                json.dumps({"instruction": ex.text, "output": ex.response}) + "\n"
                for ex in toy_generation(40)
            )
        )
        default = [
            {
                "name": "sentiment",
                "method": "lora",
                "data": sentiment,
                "text_column": "review",
                "label_column": "stars",
                "lora": {"rank": 4},
                "learning_rate": 0.01,
            },
            {
                "name": "three",
                "method": "ia3",
                "kind": "classification",
                "data": {"data": three, "text_column": "review", "label_column": "stars"},
                "learning_rate": 0.05,
            },
            {
                "name": "reply",
                "method": "adapter",
                "kind": "generation",
                "data": str(gen),
                "adapter": {"reduction_factor": 4},
            },
        ]
        config = {
            "model": str(llama_dir),
            "sampling": "temperature",
            "temperature": 2.0,
            "train": {"epochs": 3, "batch_size": 8, "max_new_tokens": 4},
            "tasks": tasks or default,
            **shared,
        }
        path = tmp_path / "multi.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


def test_train_multi_writes_one_adapter_per_task_and_prints_test_metrics(
    multi_yaml, tmp_path, capsys
) -> None:
    out = tmp_path / "bank"
    assert (
        main(
            [
                "train-multi",
                "--config",
                multi_yaml(),
                "--output",
                str(out),
                "--learning-rate",
                "0.01",
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    from multitune.health.profile import load_profile

    for task in ("sentiment", "three", "reply"):
        assert (out / task / "adapter.json").is_file() and (out / task / "adapter.safetensors").is_file()
        assert task in printed
        profile = load_profile(out / task)  # each task's drift reference, from its validation split
        assert profile is not None and profile.task == task
        assert profile.kind == ("generation" if task == "reply" else "classification")
    assert printed.count("accuracy") == 2 and "rouge_l" in printed
    summary = json.loads((out / "result.json").read_text())
    assert summary["tasks"]["three"]["examples"]["test"] == 9
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 0.01 and saved["tasks"][0]["learning_rate"] == 0.01
    assert json.loads((out / "three" / "adapter.json").read_text())["task"]["labels"] == [
        "neg",
        "pos",
        "question",
    ]

    import multitune.api  # each task folder loads alone and scores its test split as the run did

    for name in ("sentiment", "three"):
        task = multitune.api.load(out / name)
        entry = saved["tasks"][[t["name"] for t in saved["tasks"]].index(name)]
        test = DataConfig(**entry["data"]).splits("classification").test
        assert task.evaluate(test)["accuracy"] == pytest.approx(summary["tasks"][name]["test"]["accuracy"])
        assert summary["tasks"][name]["steps"] == 3 * 21  # (64 + 72 + 32 train examples) / 8 rows, 3 epochs


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "nope"}, ["unknown method 'nope'"]),
        ({"data": "missing.csv"}, ["missing.csv", "not found"]),
        ({"name": "three"}, ["unique", "three"]),
        ({"method": "full"}, ["owns the base"]),
        ({"lora": {"rank": 0}}, ["lora rank must be >= 1"]),
    ],
)
def test_train_multi_bad_inputs_print_one_error_line(multi_yaml, tmp_path, capsys, change, expected) -> None:
    tasks = yaml.safe_load(Path(multi_yaml()).read_text())["tasks"]
    tasks[0].update(change)
    if change.get("method") == "full":
        tasks[0].pop("lora")
    out = tmp_path / "bank"
    assert main(["train-multi", "--config", multi_yaml(tasks), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in expected:
        assert part in err[0], err[0]
    assert not out.exists()


def test_a_second_train_multi_into_a_held_bank_is_refused_and_changes_nothing(
    multi_yaml, tmp_path, capsys
) -> None:
    from test_storage import _holder

    out = tmp_path / "bank"
    config = multi_yaml()
    holder = _holder(out)
    try:
        assert main(["train-multi", "--config", config, "--output", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"process {holder.pid}" in err and "in use by" in err
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    ("max_steps", "eval_every", "steps"), [(3, 5, [3]), (3, 2, [2, 3]), (None, 3, [3, 4])]
)
def test_the_last_step_of_a_multi_task_run_is_always_evaluated(
    tmp_path, max_steps, eval_every, steps
) -> None:
    data = {"a": (toy_sentiment(16), toy_sentiment(8, seed=1)), "b": (toy_three(16), toy_three(8, seed=1))}
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("a", "classification", "lora", LoRAConfig(rank=2), ["neg", "pos"])
    bank.add_task("b", "classification", "ia3", None, ["neg", "pos", "question"])
    cfg = TrainConfig(epochs=1, batch_size=8, max_steps=max_steps, eval_every=eval_every, patience=100)
    results = train_multitask(bank, data, cfg, run_dir=tmp_path, progress=False)
    for task in ("a", "b"):
        assert [r["step"] for r in results[task].history] == steps
        assert results[task].best_metric is not None
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(steps)
