"""Golden sets (issue 18): a task's reference rows scored at the end of train and on every update, whose gate
refuses a version that loses them; token F1; the bad inputs, one line each."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "health"))
from helpers import save_tiny  # noqa: E402
from test_update import train_run, update, write_rows  # noqa: E402  (update's own run and data helpers)

from multitune.cli import main  # noqa: E402
from multitune.health.update import UpdateConfig, _gate  # noqa: E402
from multitune.health.versions import current_version  # noqa: E402
from multitune.metrics import token_f1  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny("bert", tmp_path_factory.mktemp("tiny") / "bert"))


def test_token_f1_is_squad_s() -> None:
    assert token_f1(["the cat sat"], ["a cat sat down"]) == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1(["Paris!"], ["paris"]) == 1.0 and token_f1(["rome"], ["paris"]) == 0.0
    assert token_f1(["", "x"], ["", "y"]) == 0.5  # two empty answers agree


def test_the_gate_refuses_a_golden_drop_beyond_the_limit() -> None:
    upd = UpdateConfig(max_forgetting=1.0, max_golden_drop=2.0)
    assert _gate(upd, 0.0, 1.0, -1.5)[0] is True
    assert _gate(upd, 0.0, 1.0, -2.5) == (
        False,
        "its golden-set score fell 2.50 points, more than --max-golden-drop 2",
    )
    assert _gate(upd, 0.0, 1.0, None)[0] is True  # no golden set: the other rules alone


def _flipped(path: Path, source: Path) -> Path:
    """The rows of ``source`` with every label swapped: an update that unlearns the task."""
    rows = list(csv.DictReader(source.open()))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"text": row["text"], "label": "neg" if row["label"] == "pos" else "pos"})
    return path


def test_train_scores_and_keeps_its_golden_set_and_update_refuses_a_version_that_loses_it(
    model, tmp_path, capsys
) -> None:
    golden = write_rows(tmp_path / "golden.csv", 20, 7)
    run = train_run(
        model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0), extra=("--golden", str(golden))
    )
    result = json.loads((run / "result.json").read_text())
    assert result["golden"]["metric"] == "accuracy" and result["golden"]["rows"] == 20
    assert (run / "golden.jsonl").exists()
    before = result["golden"]["score"]
    capsys.readouterr()
    bad = _flipped(tmp_path / "b.csv", write_rows(tmp_path / "b0.csv", 80, 1))
    flags = ("--strategy", "naive", "--epochs", "4", "--learning-rate", "0.02", "--max-forgetting", "100")
    assert update(run, bad, *flags) == 3
    out = capsys.readouterr().out
    record = json.loads((run / "versions" / "2" / "version.json").read_text())
    golden_record = record["golden"]
    assert golden_record["before"] == pytest.approx(before)
    assert golden_record["change"] < -1.0, golden_record
    assert "its golden-set score fell" in out and "golden set (20 rows): accuracy" in out
    assert current_version(run) == 1
    # the same update with a limit it stays within is promoted (the golden rule alone decided the refusal)
    assert update(run, bad, *flags, "--max-golden-drop", "100", "--promote", "auto") in (0, 3)
    assert "its golden-set score fell" not in capsys.readouterr().out


def test_bad_golden_sets_are_one_line_and_cost_no_training(model, tmp_path, capsys) -> None:
    data = write_rows(tmp_path / "a.csv", 40, 0)
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label\ngood great,maybe\n")
    code = main(
        [
            "train",
            "--model",
            model,
            "--data",
            str(data),
            "--output",
            str(tmp_path / "r"),
            "--golden",
            str(odd),
        ]
    )
    assert code == 2 and not (tmp_path / "r" / "result.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "golden set" in err[0] and "maybe" in err[0]
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert (
        main(
            [
                "train",
                "--model",
                model,
                "--data",
                str(data),
                "--output",
                str(tmp_path / "e"),
                "--golden",
                str(empty),
            ]
        )
        == 2
    )
    assert "empty.csv is empty" in capsys.readouterr().err
    run = train_run(model, tmp_path / "run", data)
    assert main(["update", str(run), "--data", str(data), "--max-golden-drop", "-1"]) == 2
    assert "--max-golden-drop must be 0 or more" in capsys.readouterr().err


def test_audit_scores_a_golden_set_alone_or_beside_the_audit(model, tmp_path, capsys) -> None:
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    golden = write_rows(tmp_path / "golden.csv", 30, 7)
    out = tmp_path / "audit"
    assert main(["audit", str(run), "--golden", str(golden), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())
    assert report["golden"]["metric"] == "accuracy" and report["golden"]["rows"] == 30
    # the score is the task's own accuracy on those rows, as eval computes it
    assert main(["eval", str(run), "--data", str(golden)]) == 0
    evaluated = capsys.readouterr().out
    assert f"accuracy {report['golden']['score']:.4f}" in printed
    assert f"{report['golden']['score']:.4f}" in evaluated
    assert "Golden set" in (out / "audit.html").read_text()
    # beside a counterfactual audit of --data, the page and the report carry both
    assert (
        main(["audit", str(run), "--data", str(golden), "--golden", str(golden), "--output", str(out)]) == 0
    )
    both = json.loads((out / "audit.json").read_text())
    assert "gender" in both["attributes"] and both["golden"]["score"] == report["golden"]["score"]
    capsys.readouterr()
    # bad inputs: neither file; a label the task does not know; membership without --data
    assert main(["audit", str(run)]) == 2
    assert "--golden FILE" in capsys.readouterr().err
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label\ngood great,maybe\n")
    assert main(["audit", str(run), "--golden", str(odd), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "maybe" in err[0] and "does not know" in err[0]
    assert main(["audit", str(run), "--golden", str(golden), "--membership"]) == 2
    assert "pass --data" in capsys.readouterr().err
