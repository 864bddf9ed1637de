"""``--report-to tensorboard,mlflow``: the run's losses, metrics, learning rate and throughput in the experiment
trackers users already read, beside metrics.jsonl (which stays the record).

TensorBoard: event files in ``RUN/tensorboard`` (``torch.utils.tensorboard``, which needs the ``tensorboard``
package). MLflow: one run per command, named after the run folder, in the tracking URI of
``MLFLOW_TRACKING_URI`` or, by default, a local file store in ``RUN/mlruns`` (MLflow 3 keeps that store in
maintenance and asks for an opt-in, ``MLFLOW_ALLOW_FILE_STORE``, which is given for the default store only); a
command started inside an active MLflow run nests under it. Both are optional dependencies: asking for one that
is not installed is one line naming the package to install.

``compare`` opens the comparison's run in its output folder and :func:`nested_run` one run per trial, final run,
rescue and seed run under it (MLflow: a child run, ``mlflow.parentRunId``, in the comparison's store, from the
compare process or the final run's own process; TensorBoard: ``OUTPUT/tensorboard/METHOD/trial-N`` and so on,
each a run of its own in TensorBoard's list); the comparison's run ends with every method's measurements and
the report (an MLflow artifact; TensorBoard text).

The run's own settings are logged as parameters (TensorBoard: a text summary), every step's mean loss and
learning rate under ``train/``, every evaluation under ``validation/`` and the final scores under ``test/``.
``RUN/trackers.json`` records where each tracker wrote (the MLflow run id, the event folder), so that the
command's final scores join the same run after the loop has closed it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from multitune.errors import ConfigError

REPORTERS = ("tensorboard", "mlflow")
STATE_FILE = "trackers.json"
EXPERIMENT = "multitune"


def parse_report_to(text: str | None) -> list[str]:
    """``tensorboard,mlflow`` -> ["tensorboard", "mlflow"]; ``none`` or empty -> []."""
    names = [part.strip().lower() for part in (text or "").split(",") if part.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ConfigError(
            f"--report-to names {', '.join(unknown)}; use tensorboard, mlflow or none (comma-separated for several)"
        )
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """One line per missing package, before a run starts."""
    for name in names:
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[name]
        try:
            __import__(module)
        except ImportError:
            package = "tensorboard" if name == "tensorboard" else "mlflow-skinny (or mlflow)"
            raise ConfigError(
                f"--report-to {name} needs the {package} package, which is not installed: pip install {package.split()[0]}"
            ) from None


def _numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key in ("step", "epoch"):
            continue
        if math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a parameter value
    return out


class Trackers:
    """The trackers of one run folder: ``log`` metrics at a step, ``close`` at the end."""

    def __init__(self, names: list[str], run_dir: Path, params: dict[str, Any] | None = None) -> None:
        check_installed(names)
        self.names, self.run_dir = names, Path(run_dir)
        self.writer: Any = None
        self.mlflow: Any = None
        self._started_mlflow = False
        state = self._state()
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.run_dir / "tensorboard"
            self.writer = SummaryWriter(log_dir=str(folder))
            state["tensorboard"] = str(folder)
            if params:
                text = "\n".join(f"    {k}: {v}" for k, v in sorted(_flat(params).items()))
                self.writer.add_text("config", text)
        if "mlflow" in names:
            import mlflow

            self.mlflow = mlflow
            if not os.environ.get("MLFLOW_TRACKING_URI") and mlflow.active_run() is None:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the default local store only
                mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
            active = mlflow.active_run()
            if active is None or state.get("mlflow_run_id") != active.info.run_id:
                mlflow.set_experiment(EXPERIMENT)
                run = mlflow.start_run(
                    run_id=state.get("mlflow_run_id"),
                    run_name=None if state.get("mlflow_run_id") else self.run_dir.name,
                    nested=active is not None,
                )
                self._started_mlflow = True
                state["mlflow_run_id"] = run.info.run_id
                state["mlflow_tracking_uri"] = mlflow.get_tracking_uri()
                state["mlflow_file_store"] = os.environ.get("MLFLOW_ALLOW_FILE_STORE") == "true"
                if params and not state.get("mlflow_params"):
                    mlflow.log_params(_flat(params))
                    state["mlflow_params"] = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def nested(
        cls, names: list[str], parent_dir: Path, name: str, params: dict[str, Any] | None = None
    ) -> Trackers:
        """A run named ``name`` nested in the runs ``parent_dir``'s trackers.json records, from this process (whose
        active MLflow run is the parent) or another (the parent's store and id are in the file)."""
        check_installed(names)
        self = cls.__new__(cls)
        self.names, self.run_dir = names, Path(parent_dir)
        self.writer, self.mlflow, self._started_mlflow = None, None, False
        state = self._state()
        if "tensorboard" in names and state.get("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            method, _, rest = name.partition(" ")
            folder = Path(state["tensorboard"]) / method / (rest.replace(" ", "-") or "run")
            self.writer = SummaryWriter(log_dir=str(folder))
            if params:
                self.writer.add_text(
                    "config", "\n".join(f"    {k}: {v}" for k, v in sorted(_flat(params).items()))
                )
        if "mlflow" in names and state.get("mlflow_run_id"):
            import mlflow

            self.mlflow = mlflow
            parent = str(state["mlflow_run_id"])
            active = mlflow.active_run()
            if active is None:  # another process: the parent's store
                if state.get("mlflow_file_store"):
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri(state["mlflow_tracking_uri"])
            experiment = mlflow.tracking.MlflowClient().get_run(parent).info.experiment_id
            mlflow.start_run(
                experiment_id=experiment, run_name=name, nested=active is not None, parent_run_id=parent
            )
            self._started_mlflow = True
            if params:
                mlflow.log_params(_flat(params))
        return self

    def tag(self, key: str, value: str) -> None:
        """A word about the run (a trial's state, a method's error): an MLflow tag, a TensorBoard text."""
        if self.writer is not None:
            self.writer.add_text(key, value)
        if self.mlflow is not None:
            self.mlflow.set_tag(key, value[:5000])

    def artifact(self, path: Path) -> None:
        """A file of the run (compare's report): an MLflow artifact; TensorBoard shows a Markdown file as text."""
        if self.writer is not None and path.suffix == ".md":
            self.writer.add_text(path.stem, path.read_text())
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path))

    def _state(self) -> dict[str, Any]:
        path = self.run_dir / STATE_FILE
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def log(self, record: dict[str, Any], step: int, prefix: str = "") -> None:
        metrics = _numbers(record, prefix)
        if not metrics:
            return
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None and self._started_mlflow:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self._started_mlflow = False


def open_trackers(
    report_to: str | None, run_dir: Path | None, params: dict[str, Any] | None = None
) -> Trackers | None:
    """The run's trackers, or None when --report-to is none or there is no run folder (a library call)."""
    names = parse_report_to(report_to)
    if not names or run_dir is None:
        return None
    return Trackers(names, run_dir, params)


def tracked(write: Any, trackers: Trackers | None) -> Any:
    """``write(record)`` that also sends the record to the trackers, at its ``step`` under ``train/``."""
    if trackers is None:
        return write

    def both(record: dict[str, Any]) -> None:
        write(record)
        trackers.log(record, int(record.get("step", 0)), "train/")

    return both


def report_final(
    report_to: str | None, run_dir: Path | None, scores: dict[str, Any], step: int, prefix: str = "test/"
) -> None:
    """The command's final scores into the same tracker runs the loop wrote (reopened from trackers.json)."""
    trackers = open_trackers(report_to, run_dir)
    if trackers is None:
        return
    try:
        trackers.log(scores, step, prefix)
    finally:
        trackers.close()


@contextmanager
def nested_run(
    report_to: str | None,
    parent_dir: Path,
    name: str,
    params: dict[str, Any] | None = None,
    finished_on: tuple[type[BaseException], ...] = (),
) -> Iterator[Trackers | None]:
    """A run nested in ``parent_dir``'s tracker runs for the body of the ``with`` (None: no --report-to, or no
    parent run); it ends FINISHED, or FAILED when the body raises anything but ``finished_on`` (a pruned trial
    finished: it was judged)."""
    names = parse_report_to(report_to)
    if not names or not (Path(parent_dir) / STATE_FILE).exists():
        yield None
        return
    trackers = Trackers.nested(names, Path(parent_dir), name, params)
    try:
        yield trackers
    except finished_on:
        trackers.close()
        raise
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()
