"""Few-shot composition (LoraHub, issue 19): weights of existing LoRA tasks found from a few examples; the
result is an ordinary LoRA task; its head is fitted by cross-validation; the bad inputs are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "health"))
from helpers import save_tiny  # noqa: E402
from test_update import train_run, write_rows  # noqa: E402

from multitune.cli import main  # noqa: E402
from multitune.compose.lorahub import cv_loss, fit_head  # noqa: E402


def test_the_fitted_head_separates_separable_features_and_cv_scores_held_out_rows() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    good = torch.randn(40, 8, generator=g) + 4.0 * labels.view(-1, 1).float()  # the label moves every feature
    noise = torch.randn(40, 8, generator=g)
    w, b = fit_head(good, labels, 2)
    assert ((good @ w.T + b).argmax(1) == labels).float().mean() == 1.0
    assert cv_loss(good, labels, 2, 4, 0) < 0.2 < cv_loss(noise, labels, 2, 4, 0)  # held-out rows judge


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compose")
    model = str(save_tiny("bert", root / "bert"))
    learn = ("--epochs", "3", "--learning-rate", "0.01")
    a = train_run(model, root / "one", write_rows(root / "a.csv", 60, 0), extra=learn)
    b = train_run(model, root / "two", write_rows(root / "b.csv", 60, 1, labels=("pos", "neu")), extra=learn)
    return a, b


def test_compose_writes_a_lora_task_that_loads_and_records_the_search(runs, tmp_path, capsys) -> None:
    from multitune.api import load

    a, b = runs
    few = write_rows(tmp_path / "few.csv", 16, 5, labels=("neg", "neu"))
    test = write_rows(tmp_path / "test.csv", 30, 6, labels=("neg", "neu"))
    out = tmp_path / "new"
    argv = ["compose", "--from", f"{a},{b}", "--data", str(few), "--test-data", str(test), "--trials", "4",
            "--max-length", "16", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "composed from 2 LoRA tasks on 16 examples (4 trials)" in printed and "bare base" in printed
    record = json.loads((out / "result.json").read_text())
    assert set(record["weights"]) == {"one", "two"} and record["kind"] == "classification"
    assert (
        record["loss"] <= record["base_loss"] + 0.05 * sum(abs(w) for w in record["weights"].values()) + 1e-9
    )
    task = load(out)
    assert task.labels == ["neg", "neu"]
    predicted = task.predict_proba(["bad awful sad", "the movie was fine"])
    assert predicted.shape == (2, 2) and torch.allclose(predicted.sum(1), torch.ones(2))
    assert main(["eval", str(out), "--data", str(test)]) == 0
    assert f"accuracy     {record['test']['accuracy']:.4f}" in capsys.readouterr().out  # what eval computes


def test_bad_compose_inputs_are_one_line(runs, tmp_path, capsys) -> None:
    a, b = runs
    one_label = tmp_path / "one.csv"
    one_label.write_text("text,label\ngood,pos\nbad,pos\nfine,pos\nsad,pos\n")
    for argv, words in [
        (["compose", "--from", f"{a},{b}", "--data", str(one_label), "--output", str(tmp_path / "x")], "two or more labels"),
        (["compose", "--from", str(a), "--data", str(one_label), "--output", str(tmp_path / "y")], "two or more tasks"),
        (["compose", "--from", f"{a},{b}", "--data", str(one_label), "--trials", "0", "--output", str(tmp_path / "z")],
         "--trials must be at least 1"),
    ]:  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
