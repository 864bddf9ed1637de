"""Memorisation (issue 18): the loss-based membership attack's AUC and advantage against hand-computed cases, a tiny
task overtrained on random labels leaking its training rows where members against members does not, the report's
files, and the bad inputs with one line each."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from helpers import WORDS, save_tiny

from multitune.cli import main
from multitune.errors import DataError
from multitune.risks.memorisation import attack_advantage, membership_auc, membership_report


# ---- the statistics ------------------------------------------------------------------------------------------
def test_auc_by_hand_with_ties() -> None:
    # members 1, 2, 3; non-members 2, 4: pairs (l_m < l_n) + half ties:
    # 1: <2, <4 -> 2;  2: =2 (0.5), <4 -> 1.5;  3: >2, <4 -> 1  => 4.5 / 6
    assert membership_auc([1, 2, 3], [2, 4]) == pytest.approx(0.75)
    assert membership_auc([1, 1], [1, 1]) == 0.5  # all ties: no leak
    assert membership_auc([0, 0.1], [5, 6]) == 1.0 and membership_auc([5, 6], [0, 0.1]) == 0.0
    same = [random.Random(3).random() for _ in range(50)]
    assert membership_auc(same, same) == pytest.approx(0.5)  # members against themselves


def test_advantage_by_hand() -> None:
    # threshold 2: TPR 2/3 (1, 2), FPR 1/2 (2); threshold 1: 1/3 - 0; threshold 3: 1 - 1/2 = 0.5 (the largest)
    assert attack_advantage([1, 2, 3], [2, 4]) == pytest.approx(0.5)
    assert attack_advantage([0, 0.1], [5, 6]) == 1.0
    assert attack_advantage([5, 6], [0, 0.1]) == 0.0


def test_report_interval_holds_the_auc() -> None:
    rng = random.Random(0)
    members = [rng.gauss(0, 1) for _ in range(40)]
    non = [rng.gauss(1, 1) for _ in range(40)]
    result = membership_report(members, non, resamples=200, seed=1)
    low, high = result["auc_ci"]
    assert low <= result["auc"] <= high and result["auc"] > 0.6
    assert result["members"] == result["non_members"] == 40
    with pytest.raises(DataError, match="at least one member"):
        membership_auc([], [1.0])


# ---- a tiny overtrained task ---------------------------------------------------------------------------------
def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def overtrained(tmp_path_factory) -> dict[str, Path]:
    """A tiny encoder fully fine-tuned for many epochs on rows of random words with random labels: all it can learn
    is the training rows themselves, so their loss falls and the held-out rows' does not."""
    tmp = tmp_path_factory.mktemp("memo")
    model = save_tiny("bert", tmp / "bert")
    rng = random.Random(0)
    rows = [(" ".join(rng.sample(WORDS, 5)), rng.choice(["pos", "neg"])) for _ in range(120)]
    data = _write(tmp / "random.csv", rows)
    run = tmp / "run"
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(run), "--method", "full",
                 "--epochs", "30", "--learning-rate", "0.003", "--patience", "100", "--batch-size", "8",
                 "--warmup-ratio", "0", "--max-length", "12", "--quiet"])  # fmt: skip
    assert code == 0
    return {"run": run, "data": data, "tmp": tmp}


def test_overtrained_task_leaks_its_training_rows(overtrained, capsys) -> None:
    out = overtrained["tmp"] / "audit"
    flags = ["--attributes", "gender", "--membership", "--resamples", "200"]
    assert (
        main(
            [
                "audit",
                str(overtrained["run"]),
                "--data",
                str(overtrained["data"]),
                "--output",
                str(out),
                *flags,
            ]
        )
        == 0
    )
    report = json.loads((out / "audit.json").read_text())["membership"]
    assert report["auc"] > 0.7 and report["auc_ci"][0] > 0.5, report
    assert report["advantage"] > 0.2 and report["members"] > report["non_members"] > 0
    assert report["mean_loss_members"] < report["mean_loss_non_members"]
    assert "membership (loss attack): AUC" in capsys.readouterr().out
    assert "Memorisation: membership attack" in (out / "audit.html").read_text()


def test_members_against_members_is_no_leak(overtrained) -> None:
    kept = overtrained["run"] / "data" / "replay.jsonl"
    members = overtrained["tmp"] / "members.jsonl"
    members.write_text(kept.read_text())
    out = overtrained["tmp"] / "audit-same"
    assert main(["audit", str(overtrained["run"]), "--data", str(overtrained["data"]), "--output", str(out),
                 "--attributes", "gender", "--membership", "--members", str(members), "--non-members",
                 str(members), "--resamples", "50"]) == 0  # fmt: skip
    report = json.loads((out / "audit.json").read_text())["membership"]
    assert report["auc"] == pytest.approx(0.5) and report["advantage"] == 0.0


def test_membership_without_kept_rows_names_the_fix(overtrained, capsys) -> None:
    adapter = next(p.parent for p in overtrained["run"].rglob("adapter.json"))
    out = overtrained["tmp"] / "audit-adapter"
    code = main(["audit", str(adapter), "--data", str(overtrained["data"]), "--output", str(out), "--attributes",
                 "gender", "--membership", "--resamples", "10"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "give --members FILE" in err and len(err.strip().splitlines()) == 1
