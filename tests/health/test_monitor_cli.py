"""``multitune train`` writes a profile; ``multitune profile`` builds one for older runs; ``multitune monitor``
compares a file with each task's reference, and says what to do with every bad input."""

from __future__ import annotations

import csv
import json
import shlex
import shutil

import pytest
from helpers import toy_sentiment

from multitune.cli import main
from multitune.health.profile import PROFILE_FILES, load_profile


def _csv(path, texts, labels=None) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"] if labels else ["review"])
        writer.writerows(zip(texts, labels, strict=True) if labels else ([t] for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def run(bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor")
    examples = toy_sentiment(120)
    data = _csv(folder / "reviews.csv", [e.text for e in examples], [e.label for e in examples])
    out = folder / "run"
    argv = [
        "train",
        "--model",
        str(bert_dir),
        "--data",
        data,
        "--text-column",
        "review",
        "--label-column",
        "stars",
    ]
    argv += ["--output", str(out), "--epochs", "3", "--batch-size", "8", "--learning-rate", "0.01", "--quiet"]
    assert main(argv) == 0
    return out


def _fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in expected:
        assert part in err[0], err[0]
    return err[0]


def test_train_writes_the_profile_into_the_adapter_folder(run) -> None:
    profile = load_profile(run / "adapter")
    assert profile is not None and profile.task == "run" and profile.labels == ["neg", "pos"]
    assert profile.rows == 12  # the validation split (10% of 120)
    assert sum((run / "adapter" / name).stat().st_size for name in PROFILE_FILES) < 100_000


def test_monitor_reports_no_drift_on_like_data_and_drift_on_other_text(run, tmp_path, capsys) -> None:
    same = toy_sentiment(60, seed=9)
    data = _csv(tmp_path / "new.csv", [e.text for e in same], [e.label for e in same])
    assert (
        main(["monitor", str(run), "--data", data, "--text-column", "review", "--label-column", "stars"]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("run: no drift (p ") and "over 60 rows" in printed[0]
    assert "estimated accuracy" in printed[0] and "accuracy on its labels" in printed[0]
    report = json.loads((tmp_path / "monitor-report" / "report.json").read_text())
    task = report["tasks"]["run"]
    assert not task["drift"]["alarm"] and set(task["drift"]["tests"]) == {
        "features",
        "labels",
        "confidence",
        "length",
    }
    assert task["labelled_rows"] == 60 and 0 <= task["accuracy"] <= 1
    page = (tmp_path / "monitor-report" / "report.html").read_text()
    assert "no drift" in page and "<script" not in page and "http" not in page.replace("http-equiv", "")

    questions = _csv(tmp_path / "questions.csv", ["what is it and why and how and where and who"] * 40)
    out = tmp_path / "out"
    assert main(["monitor", str(run), "--data", questions, "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith("run: DRIFT (p ")
    task = json.loads((out / "report.json").read_text())["tasks"]["run"]
    assert task["drift"]["alarm"] and task["drift"]["tests"]["length"]["p_value"] < 1e-3
    assert "drift detected" in (out / "report.html").read_text()


def test_a_run_without_profile_is_told_the_command_and_the_command_works(run, tmp_path, capsys) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    for name in PROFILE_FILES:
        (old / "adapter" / name).unlink()
    data = _csv(
        tmp_path / "val.csv",
        [e.text for e in toy_sentiment(30, seed=3)],
        [e.label for e in toy_sentiment(30, seed=3)],
    )
    line = _fails(
        capsys,
        ["monitor", str(old), "--data", data],
        "has no drift profile",
        "build it with `multitune profile",
    )
    advised = line.split("`")[1]  # "multitune profile OLD/adapter --data FILE"
    argv = shlex.split(advised.replace("FILE", data))[1:]
    assert main(argv) == 0
    assert "profile of task 'old-run' built from 30 rows" in capsys.readouterr().out
    assert load_profile(old / "adapter") is not None
    assert main(["monitor", str(old), "--data", data]) == 0
    assert capsys.readouterr().out.startswith("old-run: no drift")


def test_in_a_bank_a_task_without_profile_is_reported_unmonitored(run, tmp_path, capsys) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(run / "adapter", bank / "a")
    shutil.copytree(run / "adapter", bank / "b")
    for name in PROFILE_FILES:
        (bank / "b" / name).unlink()
    data = _csv(tmp_path / "new.csv", [e.text for e in toy_sentiment(40, seed=4)])
    assert main(["monitor", str(bank), "--data", data, "--output", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("a: no drift") and "accuracy on its labels" not in printed[0]
    assert (
        printed[1] == f"b: not monitored: no drift profile; run `multitune profile {bank / 'b'} --data FILE`"
    )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["tasks"]["b"] == {"monitored": False, "reason": printed[1].split(": ", 2)[2]}


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _fails(capsys, ["monitor", str(run), "--data", str(empty)], "empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("review\n")
    _fails(capsys, ["monitor", str(run), "--data", str(header_only)], "no data rows")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("colour\nred\n")
    _fails(capsys, ["monitor", str(run), "--data", str(wrong)], "colour", "--text-column")
    _fails(capsys, ["monitor", str(tmp_path / "nothing"), "--data", str(wrong)], "nothing")
    _fails(capsys, ["profile", str(run), "--data", str(wrong)], "colour")
    _fails(capsys, ["profile", str(run), "--data", str(wrong), "--max-length", "0"], "--max-length")
