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


def test_compare_nests_each_trial_final_and_seed_run_under_the_comparison(bert_dir, tmp_path, monkeypatch):
    """compare --report-to: one MLflow child run per trial, final run (in its own process) and seed run under the
    comparison's run, which ends with every method's measurements and the report; TensorBoard a folder each."""
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = _train(bert_dir, tmp_path)
    data, out = argv[argv.index("--data") + 1], tmp_path / "cmp"
    args = ["compare", "--model", str(bert_dir), "--data", data, "--methods", "lora,prompting", "--trials", "2",
            "--max-epochs", "1", "--seeds", "2", "--batch-size", "8", "--output", str(out), "--quiet"]  # fmt: skip
    assert (
        main([*args, "--report-to", "wandb"]) == 2 and not out.exists()
    )  # refused before anything is written
    assert main([*args, "--report-to", "tensorboard,mlflow"]) == 0
    state = json.loads((out / "trackers.json").read_text())
    lora = json.loads((out / "results" / "lora.json").read_text())
    prompting = json.loads((out / "results" / "prompting.json").read_text())

    client = mlflow.tracking.MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    parent = client.get_run(state["mlflow_run_id"])
    assert parent.info.run_name == "cmp" and parent.info.status == "FINISHED"
    assert parent.data.params["methods"] == "lora,prompting" and parent.data.params["trials"] == "2"
    assert parent.data.metrics["lora/test_accuracy"] == pytest.approx(lora["test"]["accuracy"])
    assert parent.data.metrics["lora/trainable_parameters"] == lora["trainable_parameters"]
    assert parent.data.metrics["lora/seeds_mean"] == pytest.approx(lora["seeds"]["mean"])
    assert parent.data.metrics["prompting/test_accuracy"] == pytest.approx(prompting["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    runs = {run.info.run_name: run for run in children}
    final = "lora rescue" if "rescue" in lora else "lora final"
    assert {
        "lora trial 1",
        "lora trial 2",
        final,
        "lora seed 1",
        "prompting trial 1",
        "prompting final",
    } <= set(runs)
    assert all(run.info.status == "FINISHED" for run in children)
    first = runs["lora trial 1"]
    assert first.data.params["method"] == "lora" and first.data.tags["state"] == "complete"
    assert "learning_rate" in first.data.params and "validation/accuracy" in first.data.metrics
    history = client.get_metric_history(first.info.run_id, "train/loss")
    assert len(history) >= 1 and [m.step for m in history] == list(range(1, len(history) + 1))
    ran = runs[final]  # logged from the final run's own process
    assert ran.data.metrics["test/accuracy"] == pytest.approx(lora["test"]["accuracy"])
    assert ran.data.metrics["run/stored_bytes"] == lora["stored_bytes"]
    assert len(client.get_metric_history(ran.info.run_id, "train/loss")) == lora["steps"]
    seed = lora["seeds"]["runs"][1]
    assert runs["lora seed 1"].data.metrics["test/accuracy"] == pytest.approx(seed["test"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial = EventAccumulator(str(out / "tensorboard" / "lora" / "trial-1"))
    trial.Reload()
    assert {"train/loss", "validation/accuracy"} <= set(trial.Tags()["scalars"])
    top = EventAccumulator(str(out / "tensorboard"))
    top.Reload()
    assert "lora/test_accuracy" in top.Tags()["scalars"]
    assert any(tag.startswith("report") for tag in top.Tags()["tensors"])  # the report's Markdown as text

    # resumed (everything kept) with and without --report-to: the same comparison, no new child runs
    assert main([*args, "--report-to", "mlflow"]) == 0 and main(args) == 0
    assert json.loads((out / "trackers.json").read_text())["mlflow_run_id"] == state["mlflow_run_id"]
    again = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(again) == len(children)
