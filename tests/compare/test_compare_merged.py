"""``compare --methods lora,merged --merge-with RUN``: the comparison's LoRA task merged with another task of the
same base is a row of the same table, with its retention recorded; its bad inputs are one line."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import toy_sentiment

from multitune.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, bert_dir) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("merged")
    data = root / "reviews.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(120)])
    other = root / "other"
    argv = ["train", "--model", str(bert_dir), "--method", "lora", "--data", str(data), "--task", "other",
            "--epochs", "1", "--max-length", "32", "--output", str(other), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return str(data), str(other)


def _args(bert_dir, data, out, *extra: str) -> list[str]:
    return ["compare", "--model", str(bert_dir), "--data", data, "--trials", "1", "--max-epochs", "1",
            "--batch-size", "8", "--max-length", "32", "--output", str(out), "--quiet", *extra]  # fmt: skip


def test_the_merged_row_is_judged_in_the_same_table(bert_dir, files, tmp_path, capsys) -> None:
    data, other = files
    out = tmp_path / "cmp"
    assert main(_args(bert_dir, data, out, "--methods", "lora,merged", "--merge-with", other)) == 0
    printed = capsys.readouterr().out
    merged = json.loads((out / "results" / "merged.json").read_text())
    lora = json.loads((out / "results" / "lora.json").read_text())
    assert merged["method"] == "merged" and merged["merged"]["method"] == "ties"
    assert [r["task"] for r in merged["merged"]["retention"]] == [lora["task"], "other"]
    own = merged["merged"]["retention"][0]
    assert own["alone"] == pytest.approx(lora["test"]["accuracy"], abs=1e-6)  # the LoRA row, rescored alone
    assert own["merged"] == pytest.approx(merged["test"]["accuracy"], abs=1e-6)
    assert merged["train_seconds"] == lora["train_seconds"]
    assert "merged" in printed and "merged" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--methods", "merged,lora", "--merge-with", "x"], "list lora before it"),
        (["--methods", "lora,merged"], "needs --merge-with"),
        (["--methods", "lora", "--merge-with", "x"], "add merged to --methods"),
        (
            ["--methods", "lora,merged", "--merge-with", "x", "--merge-method", "avg"],
            "--merge-method must be one of",
        ),
    ],
)
def test_bad_merged_flags_are_one_line(bert_dir, files, tmp_path, capsys, extra, expected) -> None:
    data, _ = files
    assert main(_args(bert_dir, data, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
