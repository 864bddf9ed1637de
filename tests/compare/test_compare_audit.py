"""``compare --audit`` and ``compare --dp-epsilon`` in the report (issue 18): the flip rate per method with its
interval and rows tested, "no rows mention" for an attribute no test row has, the audit of a method finished
before --audit was asked for, the DP column, and bad audit flags refused before any training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import has_package, toy_sentiment

from multitune.cli import main
from multitune.compare.report import write_report
from multitune.compare.run import compare
from multitune.compare.settings import CompareConfig
from multitune.config import DataConfig, TrainConfig


@pytest.fixture(scope="module")
def gendered_csv(tmp_path_factory) -> str:
    """Toy sentiment rows, every one opening with 'he' or 'she': the gender audit tests every test row; no row
    mentions an age term."""
    path = tmp_path_factory.mktemp("audit") / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        for i, ex in enumerate(toy_sentiment(120)):
            writer.writerow((f"{'he' if i % 3 else 'she'} says {ex.text}", ex.label))
    return str(path)


def _config(bert_dir: Path, data: str, out: Path, **extra) -> CompareConfig:
    train = extra.pop("train", TrainConfig(batch_size=8))
    return CompareConfig(
        model=str(bert_dir), methods=["lora"], trials=1, max_epochs=3, output=str(out), isolate=False,
        progress=False, data=DataConfig(data=data, text_column="review", label_column="stars"), train=train,
        **extra,
    )  # fmt: skip


def _row(report: str, method: str) -> list[str]:
    """The cells of ``method``'s row in report.md's table."""
    line = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_audit_reports_flip_rates_and_rows_with_no_term(bert_dir, gendered_csv, tmp_path):
    out = tmp_path / "cmp"
    compare(_config(bert_dir, gendered_csv, out), log=lambda _: None)
    first = json.loads((out / "results" / "lora.json").read_text())
    assert "audit" not in first
    # a rerun with --audit trains nothing again: the finished method is audited from its saved folder
    logged: list[str] = []
    compare(
        _config(bert_dir, gendered_csv, out, audit=True, audit_attributes=["gender", "age"]),
        log=logged.append,
    )
    result = json.loads((out / "results" / "lora.json").read_text())
    assert result["train_seconds"] == first["train_seconds"] and result["steps"] == first["steps"]
    gender, age = result["audit"]["attributes"]["gender"], result["audit"]["attributes"]["age"]
    assert (
        gender["tested"] == result["test_examples"] == result["audit"]["rows"]
    )  # every test row says he/she
    assert gender["counterfactuals"] == gender["tested"]  # one counterpart each (he <-> she)
    low, high = gender["flip_rate_ci"]
    assert 0 <= low <= gender["flip_rate"] <= high <= 1
    assert age["tested"] == 0 and age["flip_rate"] is None and age["flip_rate_ci"] is None
    assert any("lora: audit: gender:" in line and "no test rows mention age" in line for line in logged)
    report = (out / "report.md").read_text()
    assert "Flip rate, gender swaps [95% CI]" in report and "Flip rate, age swaps [95% CI]" in report
    cells = _row(report, "lora")
    assert f"{gender['flip_rate']:.1%} [{low:.1%}, {high:.1%}] ({gender['tested']} rows tested)" in cells
    assert "no rows mention age" in cells
    assert "Bias audit, age: no test row mentions a term of its lexicon" in report
    html = (out / "report.html").read_text()
    assert "no rows mention age" in html and "Flip rate, gender swaps" in html


def test_the_audit_runs_on_the_final_run_in_memory(bert_dir, gendered_csv, tmp_path):
    """--audit from the start: the final run's task is audited before it leaves memory, the same numbers a
    later audit of its saved folder gives (one model, one seeded bootstrap)."""
    from multitune.compare.audit import audit_saved
    from multitune.compare.settings import RESULTS

    config = _config(bert_dir, gendered_csv, tmp_path / "cmp", audit=True, audit_attributes=["gender"])
    compare(config, log=lambda _: None)
    result = json.loads((config.out / RESULTS / "lora.json").read_text())
    again = audit_saved(config, result, config.data.splits(config.kind).test)
    assert result["audit"]["attributes"]["gender"]["tested"] > 0
    assert again["attributes"]["gender"]["flip_rate"] == pytest.approx(
        result["audit"]["attributes"]["gender"]["flip_rate"]
    )


@pytest.mark.skipif(not has_package("opacus"), reason="opacus not installed (pip install '.[dp]')")
def test_dp_columns_show_epsilon_delta_and_noise(bert_dir, gendered_csv, tmp_path):
    out = tmp_path / "cmp"
    compare(
        _config(bert_dir, gendered_csv, out, train=TrainConfig(batch_size=8, dp_epsilon=8.0)),
        log=lambda _: None,
    )
    dp = json.loads((out / "results" / "lora.json").read_text())["dp"]
    assert 0 < dp["epsilon"] <= 8.0 and dp["noise_multiplier"] > 0
    report = (out / "report.md").read_text()
    assert "DP epsilon spent (delta, noise multiplier)" in report
    assert f"{dp['epsilon']:.2f} (delta {dp['delta']:.0e}, noise {dp['noise_multiplier']:.3g})" in _row(
        report, "lora"
    )
    assert f"lora spent epsilon {dp['epsilon']:.2f} of 8" in report
    # the methods --dp-epsilon refuses are named with the reason under the table
    assert (
        "Not trainable under --dp-epsilon, so not compared: full (full fine-tuning trains every weight"
        in report
    )


def test_report_of_generation_audit_and_mixed_privacy(tmp_path):
    """From result files alone: a generation task's log-probability change, a method without DP beside one
    with it, and a method that did not learn (its flip rate is not shown as the method's)."""
    base = {"metric": "rouge_l", "test": {"rouge_l": 0.5}, "trainable_parameters": 10, "steps": 3}
    audit = {"attributes": {"gender": {"tested": 4, "mean_delta_logp": -0.25, "mean_delta_logp_ci": [-0.5, -0.1]},
                            "age": {"tested": 0, "mean_delta_logp": None}}}  # fmt: skip
    results = [
        {**base, "method": "lora", "audit": audit, "dp": {"epsilon": 2.9871, "target_epsilon": 3.0, "delta": 1e-5,
                                                          "noise_multiplier": 1.2345}},
        {**base, "method": "ia3", "audit": audit, "learned": False, "problem": "task 't' did not learn: one label"},
    ]  # fmt: skip
    paths = write_report(tmp_path, results, {"kind": "generation", "metric": "rouge_l"})
    report = paths["md"].read_text()
    assert "Change in response log-prob, gender swaps [95% CI]" in report
    assert "-0.250 [-0.500, -0.100] (4 rows tested)" in _row(report, "lora")
    assert "n/a (did not learn)" in _row(report, "ia3") and "not private" in _row(report, "ia3")
    assert "no rows mention age" in _row(report, "lora")
    assert "2.99 (delta 1e-05, noise 1.23)" in _row(report, "lora")
    assert "lora spent epsilon 2.99 of 3 at delta 1e-05, noise multiplier 1.23; not private: ia3." in report


def _cli(bert_dir: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["compare", "--model", str(bert_dir), "--data", data, "--text-column", "review", "--label-column",
            "stars", "--methods", "lora", "--trials", "1", "--max-epochs", "1", "--output", str(out), "--quiet",
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--audit", "--audit-attributes", "gender,colour"],
            "--audit-attributes: unknown attribute 'colour'",
        ),
        (["--audit-attributes", "gender"], "add --audit to run it"),
        (["--audit", "--audit-language", "fr"], "--audit-language 'fr' has no lexicon; use en or it"),
        (["--audit", "--audit-attributes", " , "], "--audit-attributes is empty"),
    ],
)
def test_bad_audit_flags_are_one_line_before_any_training(
    bert_dir, gendered_csv, tmp_path, capsys, extra, expected
):
    out = tmp_path / "cmp"
    assert main(_cli(bert_dir, gendered_csv, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not out.exists()  # refused before the output folder, the study or any training
