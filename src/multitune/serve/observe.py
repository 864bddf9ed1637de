"""Prometheus metrics of a server: requests by endpoint, task and status, latencies, batch sizes, tokens.

The app has its own registry (not the global one: tests build many apps in one process). Task labels are the
served tasks' names or "unknown", so that labels never grow with what clients send.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

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

    def render(self) -> bytes:
        self.drain_batches()
        return generate_latest(self.registry)
