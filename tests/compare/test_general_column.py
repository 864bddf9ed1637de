"""compare's general-ability column: each generation method's general-text perplexity in its result and the
report beside the bare base's; ``--general-data`` read before any training; refused for classification."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import toy_generation

from multitune.bank import MultiTaskModel
from multitune.cli import build_parser
from multitune.compare.cli import compare_config
from multitune.compare.run import GENERAL_MAX_LENGTH, compare
from multitune.compare.settings import CompareConfig
from multitune.compare.table import perplexity_text
from multitune.config import DataConfig, TrainConfig
from multitune.errors import ConfigError, DataError
from multitune.flags import parse_args
from multitune.health.general import general_perplexity, read_general
from multitune.models import load_base

GENERAL = "the film was good and the food was nice\n\nit is not what it was\n\nwhy is the service so poor\n"


def _config(llama_dir, tmp_path, **changes) -> CompareConfig:
    data = tmp_path / "gen.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows([(ex.text, ex.response) for ex in toy_generation(32)])
    general = tmp_path / "general.txt"
    general.write_text(GENERAL, encoding="utf-8")
    values = {
        "model": str(llama_dir),
        "kind": "generation",
        "methods": ["lora", "full"],
        "trials": 1,
        "max_epochs": 1,
        "output": str(tmp_path / "out"),
        "isolate": False,
        "progress": False,
        "general_data": str(general),
        "data": DataConfig(data=str(data), prompt_column="prompt", response_column="response"),
        "train": TrainConfig(batch_size=8, max_new_tokens=2, max_length=64),
    }
    return CompareConfig(**{**values, **changes})


def test_generation_methods_get_a_general_perplexity_beside_the_base(llama_dir, tmp_path, one_thread) -> None:
    config = _config(llama_dir, tmp_path)
    lines: list[str] = []
    summary = compare(config, log=lines.append)
    assert not summary["failures"]
    results = {r["method"]: r for r in summary["results"]}
    texts = read_general(config.general_data)
    base = general_perplexity(
        MultiTaskModel(load_base(str(llama_dir))), None, texts, min(GENERAL_MAX_LENGTH, 64)
    )
    for method in ("lora", "full"):
        value = json.loads((config.out / "results" / f"{method}.json").read_text())["general_perplexity"]
        assert value == results[method]["general_perplexity"] and value > 1.0
        assert any(line.startswith(f"{method}: test") and "general-text perplexity" in line for line in lines)
    assert results["full"]["general_perplexity"] != pytest.approx(base, rel=1e-4)  # every weight trained
    report = (config.out / "report.md").read_text()
    assert f"General-text perplexity (base {perplexity_text(base)}; lower is better)" in report
    assert f"General text**: {config.general_data}" in report
    header = next(line for line in report.splitlines() if line.startswith("| Method"))
    column = [c.strip() for c in header.split("|")].index(
        f"General-text perplexity (base {perplexity_text(base)}; lower is better)"
    )
    for method in ("lora", "full"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
        assert [c.strip() for c in row.split("|")][column] == perplexity_text(
            results[method]["general_perplexity"]
        )
    assert f"General-text perplexity (the base's is {perplexity_text(base)};" in report  # Reading the table
    assert "General-text perplexity" in (config.out / "report.html").read_text()


def test_a_bad_general_file_fails_before_any_training(llama_dir, tmp_path) -> None:
    config = _config(llama_dir, tmp_path, general_data=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="missing.txt does not exist"):
        compare(config, log=lambda _: None)
    assert not (config.out / "results").exists()


def test_general_data_is_refused_for_classification(llama_dir, tmp_path) -> None:
    config = _config(llama_dir, tmp_path, kind="classification")
    with pytest.raises(ConfigError, match="--general-data is the general-text sample of generation tasks"):
        compare(config, log=lambda _: None)


def test_the_flag_reaches_the_config() -> None:
    args = ["compare", "--data", "d.csv", "--kind", "generation"]
    assert compare_config(parse_args(build_parser(), args)).general_data is None
    given = compare_config(parse_args(build_parser(), [*args, "--general-data", "g.txt"]))
    assert given.general_data == "g.txt" and given.fingerprint()["general_data"] == "g.txt"
