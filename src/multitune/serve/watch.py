"""The scheduler's side of drift monitoring: which profile watches which served task, and the served rows
handed to the :class:`multitune.health.live.Monitor`.

Everything here runs on the scheduler's worker thread, the one thread that runs torch (a second would add an
OpenMP pool, see :func:`multitune.serve.scheduler.in_passing_thread`), after the answers of a batch are
settled, and never raises into the scheduler: a fault of the monitor skips its rows and is logged once per
task. What it hands over was computed by the forwards that served the rows: each classification row's pooled
vector, token length and unknown-token rate (:meth:`Engine.classify_rows` with ``features=True``), and each
finished generation's sampled tokens and their mean log-probability, from the logits of its decode steps
(:func:`token_logprobs`). Tasks are watched under their public names; a reload watches the new version against
its own profile, and rows still running on a retired version are not observed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from multitune.errors import MultituneError
from multitune.health.live import Monitor
from multitune.health.profile import Profile, load_profile
from multitune.serve.decode import Handle
from multitune.serve.engine import Classification
from multitune.serve.names import TaskNames

log = logging.getLogger("multitune.serve.scheduler")


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """log softmax(logits)[token] of each row (B, V): the model's log-probability of the token it emitted,
    from the logits the step computed anyway (one gather and one logsumexp over the vocabulary)."""
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1)
    return (chosen - torch.logsumexp(logits, dim=-1)).tolist()


class Watch:
    """The served tasks' monitor (None when monitoring is off) and what feeds it."""

    def __init__(
        self, engine: Any, names: TaskNames, enabled: bool = True, options: dict[str, Any] | None = None
    ) -> None:
        self.engine, self.names = engine, names
        self.faults: set[str] = set()  # tasks whose observation failed (logged once each)
        self.monitor: Monitor | None = (
            Monitor(
                {name: self.profile(internal) for name, internal in names.internal.items()}, **(options or {})
            )
            if enabled
            else None
        )

    # ---- which profile watches which task ------------------------------------------------------------
    def profile(self, internal: str) -> Profile | None:
        """The reference profile saved beside a task's adapter, or None (the task is then served unmonitored,
        and /v1/monitor says how to build one). A profile that cannot be read, or was built on a base of
        another width, is logged and never fatal."""
        source = getattr(self.engine, "adapters", {}).get(internal)  # the version's folder actually loaded
        if source is None:
            return None
        try:
            profile = load_profile(source)
        except MultituneError as error:
            log.warning("task %s is served unmonitored: %s", internal, " ".join(str(error).split()))
            return None
        hidden = self.engine.bank_of(internal).base.hidden_size
        if profile is not None and profile.has_features and profile.mean.shape[0] != hidden:
            log.warning(
                "task %s is served unmonitored: its profile in %s was built on a base of hidden size %d, "
                "this one has %d; rebuild it with multitune profile",
                internal,
                source,
                profile.mean.shape[0],
                hidden,
            )
            return None
        return profile

    def watch(self, name: str) -> None:
        """Watch a task just loaded or reloaded against its (new) version's profile, from a fresh window."""
        if self.monitor is not None:
            self.monitor.add(name, self.profile(self.names.internal[name]))

    def forget(self, name: str) -> None:
        if self.monitor is not None:
            self.monitor.remove(name)

    def current(self, task: str, internal: str) -> bool:
        """Whether ``internal`` is still the version ``task`` names: rows of a retired version are not
        compared with the new version's reference (its adapter gives other features)."""
        return self.names.internal.get(task) == internal

    # ---- served rows in ----------------------------------------------------------------------------------
    def classified(self, groups: Iterable[tuple[str, str, list[Classification]]]) -> None:
        """The rows of one classification forward, as (public task, internal name, its rows) per request:
        one monitor call per task."""
        if self.monitor is None:
            return
        by_task: dict[str, list[Classification]] = {}
        for task, internal, rows in groups:
            if self.current(task, internal):
                by_task.setdefault(task, []).extend(rows)
        for task, rows in by_task.items():
            self._safely(self._rows, task, rows)

    def _rows(self, task: str, rows: list[Classification]) -> None:
        """One task's rows as the monitor takes them: pooled (n, H), probabilities (n, C)."""
        assert self.monitor is not None
        vectors = [row.pooled for row in rows]
        pooled = None if any(v is None for v in vectors) else torch.stack(vectors)  # type: ignore[arg-type]
        probabilities = torch.tensor([list(row.probabilities.values()) for row in rows])
        lengths, unknown = [row.length for row in rows], [row.unknown_rate for row in rows]
        self.monitor.observe(task, pooled, probabilities, lengths, unknown)

    def generated(self, handles: list[Handle]) -> None:
        """Finished generations (stop or length): the tokens sampled and their mean log-probability, the
        end-of-sequence token included in both (as the profile counts a response: its tokens and EOS,
        teacher-forced)."""
        if self.monitor is None:
            return
        by_task: dict[str, tuple[list[int], list[float]]] = {}
        for handle in handles:
            if handle.finish_reason in ("stop", "length") and self.current(handle.task, handle.internal):
                lengths, logprobs = by_task.setdefault(handle.task, ([], []))
                lengths.append(handle.logprob_count)
                logprobs.append(handle.logprob_sum / max(1, handle.logprob_count))
        for task, (lengths, logprobs) in by_task.items():
            self._safely(self.monitor.observe_generation, task, lengths, logprobs)

    def _safely(self, observe: Callable[..., Any], task: str, *args: Any) -> None:
        """Monitoring never fails a request nor the worker: a fault is logged (with its traceback the first
        time for each task, so that a persistent one does not flood the log) and the rows are skipped."""
        try:
            observe(task, *args)
        except Exception as error:  # noqa: BLE001  (the answers are out already; serving goes on)
            if task in self.faults:
                log.debug("the drift monitor failed again on task %r: %s", task, error)
            else:
                self.faults.add(task)
                log.exception("the drift monitor failed to observe rows of task %r", task)
