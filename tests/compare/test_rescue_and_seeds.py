"""``multitune compare`` with methods that did not learn (rescued, or reported "did not learn" and never ranked)
and with ``--seeds N`` (mean and spread of the test metric); a resumed compare keeps both.

Whether a run learned is decided by ``train`` (multitune.training.learned); here a wrapped ``train`` decides
it instead, so that each path is taken on purpose and the tiny models' own luck plays no part.
"""

from __future__ import annotations

import csv
import json
import statistics

import optuna
import pytest
from helpers import toy_sentiment

import multitune.training.train as train_module
from multitune.compare.run import compare
from multitune.compare.search import RESCUE_LEARNING_RATE_SCALE, RESCUE_SLOW_SCALE
from multitune.compare.settings import CompareConfig
from multitune.compare.table import describe_params
from multitune.config import DataConfig, TrainConfig
from multitune.errors import ConfigError
from multitune.methods import METHODS

REASON = "forced by the test"


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rescue") / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(80)])
    return str(path)


def _config(bert_dir, data_csv, out, methods, seeds=1) -> CompareConfig:
    return CompareConfig(
        model=str(bert_dir),
        methods=methods,
        trials=1,
        max_epochs=1,
        seeds=seeds,
        output=str(out),
        isolate=False,  # the final runs in this process: they see the wrapped train
        progress=False,
        data=DataConfig(data=data_csv, text_column="review", label_column="stars"),
        train=TrainConfig(batch_size=8),
    )


def _forced(monkeypatch, fails, cause: str | None = None) -> list[dict]:
    """Wrap train: ``fails(method, desc, config)`` decides whether the run did not learn (its ``cause`` as
    given: None is what a run recorded before causes were); returns the calls."""
    real = train_module.train
    calls: list[dict] = []

    def train(bank, task, train_examples, validation_examples, config, *args, **kwargs):
        result = real(bank, task, train_examples, validation_examples, config, *args, **kwargs)
        method, desc = bank.tasks[task].method, kwargs.get("desc") or ""
        calls.append({"method": method, "desc": desc, "lr": config.learning_rate, "seed": config.seed})
        result.problem = (
            f"task '{task}' did not learn: {REASON}; likely cause: a learning rate too high for {method}; "
            "try --learning-rate 0.0001"
            if fails(method, desc, config)
            else None
        )
        result.cause = cause if result.problem else None
        return result

    monkeypatch.setattr(train_module, "train", train)
    return calls


def _result(out, method) -> dict:
    return json.loads((out / "results" / f"{method}.json").read_text())


def _reading(out) -> str:
    return (out / "report.md").read_text().split("## Reading the table", 1)[1].split("## Plots", 1)[0]


def test_a_best_trial_that_did_not_learn_is_rescued_at_a_quarter_of_the_learning_rate(
    bert_dir, data_csv, tmp_path, monkeypatch
):
    default = METHODS["lora"].default_learning_rate
    calls = _forced(monkeypatch, lambda method, desc, config: config.learning_rate > default / 2)
    out, lines = tmp_path / "cmp", []
    compare(_config(bert_dir, data_csv, out, ["lora"]), log=lines.append)
    # the one trial (the defaults) did not learn: its final run would repeat it, so the rescue is the final run
    assert [c["lr"] for c in calls] == [default, default * RESCUE_LEARNING_RATE_SCALE]
    study = optuna.load_study(study_name="task-lora", storage=f"sqlite:///{out / 'study.db'}")
    assert REASON in study.trials[0].user_attrs["problem"]
    result = _result(out, "lora")
    assert result["learned"] is True and result["problem"] is None
    assert result["best_params"]["learning_rate"] == pytest.approx(default / 4)
    rescue = result["rescue"]
    assert rescue["learned"] is True and REASON in rescue["problem"] and "best trial" in rescue["after"]
    assert rescue["from_params"]["learning_rate"] == default
    assert rescue["params"] == result["best_params"]
    assert any(line.startswith("rescued: lora learned") for line in lines), lines
    reading = _reading(out)
    before = describe_params({"learning_rate": default})
    assert f"lora was rescued: its best trial (trial 1; none learned) did not learn at {before}" in reading
    assert f"({REASON})" in reading and "Best test accuracy (higher is better): lora" in reading
    assert "(rescue run)" in (out / "report.md").read_text()


def test_a_run_whose_loss_was_still_falling_is_rescued_at_four_times_the_learning_rate(
    bert_dir, data_csv, tmp_path, monkeypatch
):
    """A slow run (learned.cause_of) needs more update, not less: the rescue moves the rate up, and the
    report says which way it went."""
    default = METHODS["adapter"].default_learning_rate
    calls = _forced(monkeypatch, lambda method, desc, config: config.learning_rate < 2 * default, "slow")
    out, lines = tmp_path / "cmp", []
    compare(_config(bert_dir, data_csv, out, ["adapter"]), log=lines.append)
    assert [c["lr"] for c in calls] == [default, default * RESCUE_SLOW_SCALE]
    study = optuna.load_study(study_name="task-adapter", storage=f"sqlite:///{out / 'study.db'}")
    assert study.trials[0].user_attrs["cause"] == "slow"
    result = _result(out, "adapter")
    assert result["learned"] is True and result["rescue"]["cause"] == "slow"
    assert result["best_params"]["learning_rate"] == pytest.approx(4 * default)
    assert any("rescue: one more run at four times the learning rate" in line for line in lines), lines
    assert "one more run at four times the learning rate" in _reading(out)


def test_methods_that_never_learn_are_reported_did_not_learn_and_never_ranked(
    bert_dir, data_csv, tmp_path, monkeypatch
):
    """ia3's trial learns but its final run and rescue do not; prompting never learns and has no learning rate
    to lower; lora learns. Only lora is ranked."""

    def fails(method, desc, config):
        return (method == "ia3" and desc == "ia3 final") or method == "prompting"

    calls = _forced(monkeypatch, fails)
    out, lines = tmp_path / "cmp", []
    summary = compare(_config(bert_dir, data_csv, out, ["ia3", "prompting", "lora"]), log=lines.append)
    default = METHODS["ia3"].default_learning_rate
    assert [c["lr"] for c in calls if c["method"] == "ia3"] == [default, default, default / 4]
    ia3, prompting, lora = (_result(out, m) for m in ("ia3", "prompting", "lora"))
    assert ia3["learned"] is False and REASON in ia3["problem"]
    assert ia3["rescue"]["after"] == "final run" and ia3["rescue"]["learned"] is False
    assert prompting["learned"] is False and "rescue" not in prompting  # nothing to train: no rescue
    assert "prompting: its final run did not learn; it trains nothing, so there is no rescue" in lines
    assert "ia3: the rescue did not learn either" in lines
    assert any(line.startswith(f"ia3: did not learn ({REASON}); its test accuracy") for line in lines), lines
    assert lora["learned"] is True and "rescue" not in lora
    assert summary["failures"] == {}  # not learning is a finding, not a failure

    md = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for method, result in (("ia3", ia3), ("prompting", prompting)):
        assert f"did not learn (scored {result['test']['accuracy']:.3f})" in rows[method]
        assert "**" not in rows[method]
    assert "**" in rows["lora"]
    reading = _reading(out)
    assert "Best test accuracy (higher is better): lora" in reading and "Runner-up" not in reading
    lowered = describe_params({"learning_rate": default / 4})
    assert (
        f"ia3 did not learn: {REASON}; the rescue run at a quarter of the learning rate ({lowered}) did not "
        "learn either. Its test accuracy" in reading
    )
    assert f"prompting did not learn: {REASON}. Its test accuracy" in reading
    assert "is not its quality on this task, so it is not ranked" in reading
    assert "with multitune train --method ia3" in reading
    assert "ia3 " + f"{ia3['test']['accuracy']:.3f} with" not in reading  # no efficiency claim for it
    assert (out / "plots" / "quality_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_give_a_mean_and_spread_and_a_resumed_compare_keeps_them(
    bert_dir, data_csv, tmp_path, monkeypatch
):
    calls = _forced(monkeypatch, lambda method, desc, config: method == "prompting")
    out = tmp_path / "cmp"
    config = _config(bert_dir, data_csv, out, ["lora", "prompting"], seeds=2)
    compare(config, log=lambda _: None)
    lora, prompting = _result(out, "lora"), _result(out, "prompting")
    assert [(c["desc"], c["seed"]) for c in calls if c["method"] == "lora"] == [
        ("lora trial 1/1", 0),
        ("lora final", 0),
        ("lora seed 1 (2/2)", 1),
    ]
    seeds = lora["seeds"]
    values = [run["test"] for run in seeds["runs"]]
    assert [run["seed"] for run in seeds["runs"]] == [0, 1] and seeds["n"] == 2 and seeds["learned"] == 2
    assert values[0] == lora["test"]["accuracy"]  # the final run is the first seed
    assert seeds["mean"] == pytest.approx(statistics.fmean(values))
    assert seeds["std"] == pytest.approx(statistics.stdev(values))
    assert (seeds["min"], seeds["max"]) == (min(values), max(values))
    # prompting trains nothing: the seed changes nothing of it, it is not rerun
    assert prompting["seeds"]["trains"] is False and prompting["seeds"]["n"] == 1
    assert prompting["seeds"]["learned"] == 0 and prompting["learned"] is False
    md = (out / "report.md").read_text()
    assert "Test accuracy over seeds: mean ± std (min–max)" in md
    assert f"{seeds['mean']:.3f} ± {seeds['std']:.3f} ({seeds['min']:.3f}–{seeds['max']:.3f}, 2 seeds)" in md
    assert "- **Seeds per method**: 2" in md

    before = {m: (out / "results" / f"{m}.json").read_bytes() for m in ("lora", "prompting")}
    monkeypatch.undo()  # the rerun trains nothing: both results are kept as they are
    lines: list[str] = []
    compare(config, log=lines.append)
    assert sum("done in an earlier run" in line for line in lines) == 2, lines
    assert {m: (out / "results" / f"{m}.json").read_bytes() for m in before} == before
    md = (out / "report.md").read_text()
    assert "did not learn (scored" in md and f"{seeds['mean']:.3f} ± {seeds['std']:.3f}" in md
    with pytest.raises(ConfigError, match=r"other settings \(seeds\)"):
        compare(_config(bert_dir, data_csv, out, ["lora"], seeds=3), log=lambda _: None)


def test_seeds_of_one_is_todays_compare(bert_dir, data_csv, tmp_path):
    """--seeds 1 (the default): no seed runs, no seeds field, no seeds column; the fingerprint is unchanged."""
    config = _config(bert_dir, data_csv, tmp_path / "cmp", ["prompting"])
    assert "seeds" not in config.fingerprint()
    compare(config, log=lambda _: None)
    assert "seeds" not in _result(tmp_path / "cmp", "prompting")
    assert "over seeds" not in (tmp_path / "cmp" / "report.md").read_text()
