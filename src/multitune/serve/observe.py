"""Prometheus metrics of a server: requests by endpoint, task and status, latencies, batch sizes, tokens, and
per task its drift and quality gauges (:class:`MonitorCollector`, computed when scraped).

The app has its own registry (not the global one: tests build many apps in one process). Task labels are the
served tasks' names or "unknown", so that labels never grow with what clients send.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("multitune.serve")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class Stats:
    """What the server exports: recent forward batch sizes (drained by the metrics endpoint) and the queue."""

    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    queue_depth: int = 0
    forwards: int = 0

    def record(self, kind: str, size: int) -> None:
        self.batch_sizes.append((kind, size))
        self.forwards += 1

    def drain(self) -> list[tuple[str, int]]:
        out = []
        while self.batch_sizes:
            out.append(self.batch_sizes.popleft())
        return out


class Metrics:
    """The app's own Prometheus registry (not the global one: tests build many apps in one process)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "multitune_requests_total",
            "HTTP requests answered",
            ["endpoint", "task", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "multitune_request_seconds",
            "Time from request to the last byte of its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "multitune_batch_size",
            "Rows in each forward of the scheduler, by kind of forward",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "multitune_generated_tokens_total", "Tokens generated", ["task"], registry=self.registry
        )
        self.in_flight = Gauge(
            "multitune_requests_in_flight", "API requests being answered", registry=self.registry
        )
        queue = Gauge(
            "multitune_queue_depth", "Requests waiting in the scheduler's queue", registry=self.registry
        )
        queue.set_function(self._queue_depth)
        tasks = Gauge("multitune_tasks", "Tasks served", registry=self.registry)
        tasks.set_function(lambda: len(self._tasks()))
        with contextlib.suppress(Exception):  # /proc may be missing (not Linux): the rest still works
            ProcessCollector(registry=self.registry)

    def _tasks(self) -> dict[str, Any]:
        try:
            return self.scheduler.tasks()
        except Exception:  # noqa: BLE001  (a label must never fail a request)
            return {}

    def _queue_depth(self) -> float:
        return float(self.scheduler.stats.queue_depth)

    def task_label(self, task: str | None) -> str:
        """The task's name when it is served, else "unknown": labels must not grow with what clients send."""
        return task if task and task in self._tasks() else "unknown"

    def drain_batches(self) -> None:
        """Move the batch sizes the scheduler recorded since the last call (``Stats.drain``) into the histogram."""
        for kind, size in self.scheduler.stats.drain():
            self.batch_size.labels(kind=kind).observe(float(size))

    def watch(self, state: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Export the per-task gauges of :class:`MonitorCollector` from ``state()`` (what /v1/monitor shows)."""
        self.registry.register(MonitorCollector(state))

    def render(self) -> bytes:
        self.drain_batches()
        return generate_latest(self.registry)


# (gauge name, help, how to read it from a task's /v1/monitor entry)
MONITOR_GAUGES: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    (
        "multitune_monitored",
        "1 when the task has a reference profile and is watched for drift",
        lambda t: t.get("monitored"),
    ),
    (
        "multitune_monitor_requests",
        "Rows of the task the monitor observed since it was loaded",
        lambda t: t.get("requests"),
    ),
    (
        "multitune_drift_score",
        "Drift score of the task's window against its reference (higher: further)",
        lambda t: _drift(t, "score"),
    ),
    (
        "multitune_drift_p_value",
        "p-value of the task's drift test on its window",
        lambda t: _drift(t, "p_value"),
    ),
    (
        "multitune_drift_alarm",
        "1 while the task's drift alarm is raised, else 0",
        lambda t: _drift(t, "alarm"),
    ),
    (
        "multitune_drift_alarms",
        "Drift alarm episodes of the task since it was loaded",
        lambda t: _drift(t, "alarms"),
    ),
    (
        "multitune_estimated_accuracy",
        "Label-free accuracy estimate (mean calibrated confidence) on the window",
        lambda t: t.get("estimated_accuracy"),
    ),
    (
        "multitune_live_accuracy",
        "Accuracy of the task's answers that got feedback (all of it)",
        lambda t: _live(t, "accuracy"),
    ),
    (
        "multitune_live_macro_f1",
        "Macro-F1 of the task's answers that got feedback (all of it)",
        lambda t: _live(t, "macro_f1"),
    ),
    (
        "multitune_live_mean_rating",
        "Mean rating of the generation task's rated answers",
        lambda t: _live(t, "mean_rating"),
    ),
    ("multitune_feedback", "Answers of the task that got feedback", lambda t: _live(t, "feedback")),
)


def _drift(task: dict[str, Any], key: str) -> Any:
    drift = task.get("drift")
    return drift.get(key) if isinstance(drift, dict) else None


def _live(task: dict[str, Any], key: str) -> Any:
    live = task.get("live")
    return live.get(key) if isinstance(live, dict) else None


class MonitorCollector:
    """Per-task gauges of drift (score, p-value, alarm, episodes), the label-free accuracy estimate and live
    quality from feedback, read from ``state()`` (the ``tasks`` of /v1/monitor) when Prometheus scrapes.

    Computed at scrape time, not set as rows are served, so that serving pays nothing for them and a task
    that is unloaded simply stops being exported. A value that is not known yet (no window, no feedback) is
    left out rather than exported as 0, which an alert would read as a fact. Labels are served task names.
    """

    def __init__(self, state: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration (collect() then would read a monitor still starting)

    def collect(self) -> Iterator[Metric]:
        try:
            tasks = self._state()
        except Exception:  # noqa: BLE001  (a scrape must never fail on the monitor)
            log.exception("reading the monitor's state for /metrics failed")
            tasks = {}
        for name, help_text, read in MONITOR_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["task"])
            for task, entry in sorted(tasks.items()):
                value = read(entry) if isinstance(entry, dict) else None
                if isinstance(value, bool | int | float) and value == value:  # not None, not NaN
                    family.add_metric([task], float(value))
            yield family
