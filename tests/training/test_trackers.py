"""--report-to tensorboard,mlflow: a tiny train run's losses, metrics and test scores read back from each tracker."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import toy_sentiment

from multitune.cli import main
from multitune.errors import ConfigError
from multitune.trackers import check_installed, parse_report_to


def _train(bert_dir, tmp_path, *extra: str) -> list[str]:
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(64)])
    return ["train", "--model", str(bert_dir), "--data", str(data), "--output", str(tmp_path / "run"),
            "--epochs", "2", "--batch-size", "8", "--learning-rate", "0.01", "--quiet", *extra]  # fmt: skip


def test_tensorboard_and_mlflow_read_back(bert_dir, tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(_train(bert_dir, tmp_path, "--report-to", "tensorboard,mlflow")) == 0
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    state = json.loads((run / "trackers.json").read_text())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(state["tensorboard"])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "validation/accuracy",
        "test/accuracy",
        "train/steps_per_second",
    } <= tags
    assert len(events.Scalars("train/loss")) == result["steps"]
    assert events.Scalars("test/accuracy")[-1].value == pytest.approx(result["test"]["accuracy"])
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])  # the run's settings as text

    client = mlflow.tracking.MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    logged = client.get_run(state["mlflow_run_id"])
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert logged.data.metrics["test/accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert (
        logged.data.params["learning_rate"] == "0.01"
        and logged.data.params["report_to"] == "tensorboard,mlflow"
    )
    history = client.get_metric_history(state["mlflow_run_id"], "train/loss")
    assert [m.step for m in history] == list(range(1, result["steps"] + 1))
    assert state["mlflow_tracking_uri"].startswith("file:") and (run / "mlruns").is_dir()


def test_no_tracker_by_default(bert_dir, tmp_path) -> None:
    assert main(_train(bert_dir, tmp_path)) == 0
    assert (
        not (tmp_path / "run" / "trackers.json").exists() and not (tmp_path / "run" / "tensorboard").exists()
    )


def test_report_to_is_checked_in_one_line(bert_dir, tmp_path, capsys, monkeypatch) -> None:
    assert parse_report_to("none") == [] and parse_report_to("mlflow, tensorboard") == [
        "mlflow",
        "tensorboard",
    ]
    with pytest.raises(ConfigError, match="use tensorboard, mlflow or none"):
        parse_report_to("wandb")
    assert main(_train(bert_dir, tmp_path, "--report-to", "wandb")) == 2
    assert "--report-to names wandb" in capsys.readouterr().err
    import builtins

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    with pytest.raises(ConfigError, match="pip install mlflow-skinny"):
        check_installed(["mlflow"])
    assert main(_train(bert_dir, tmp_path, "--report-to", "mlflow")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the mlflow-skinny (or mlflow) package" in err
    assert not (tmp_path / "run" / "result.json").exists()


def test_compare_refuses_report_to_in_one_line(bert_dir, tmp_path, capsys) -> None:
    argv = _train(bert_dir, tmp_path)
    data = argv[argv.index("--data") + 1]
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(bert_dir), "--data", data, "--methods", "lora", "--output", str(out)]
    assert main([*args, "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "compare does not send its trials to experiment trackers yet" in err
    assert not (out / "report.html").exists()
