"""Per-row routing state shared by every layer a method injects.

The bank sets it before each forward and clears it after; injected layers read it to know which task
each row of the batch belongs to. It is a plain object, not a module, so it never appears in a state
dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    """Which task each row of the current batch belongs to."""

    slots: list[str] = field(default_factory=list)  # bank task order: row ids index into this
    row_tasks: torch.Tensor | None = None  # (B,) long: slot of each row
    single: str | None = None  # the task of every row, when the batch has one task (the fast path)
    disabled: bool = False  # every adapter passes through: the frozen base (reference model for DPO/PPO)
    version: int = 0  # bumped when tasks are added or removed, so layers drop stacked caches
    batch: int = 0  # bumped for each routed batch: layers keep what they gathered per row for one batch
    entry: int = 0  # bumped at every routing, even of the same batch: parameters may change between two
    # a stacked task -> the tasks under it, bottom first (multitune.compose.stack): its rows run them too
    components: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _last: tuple[torch.Tensor, int, str | None, int] | None = field(default=None, repr=False)

    def set_rows(self, row_tasks: torch.Tensor) -> None:
        """Route a batch. The same tensor routed again, unchanged (every decoding step of a batch), is the
        same batch. A tensor made under ``torch.inference_mode()`` has no version counter to tell whether it
        was changed in place, so each of its routings is a new batch."""
        self.entry += 1
        self.row_tasks = row_tasks
        version = -1 if row_tasks.is_inference() else row_tasks._version
        last = self._last
        if (
            last is not None
            and row_tasks is last[0]
            and version >= 0
            and version == last[1]
            and last[3] == self.version
        ):
            self.single = last[2]  # the same batch: no device sync to find out again whether it is uniform
            return
        self.batch += 1
        first = int(row_tasks[0]) if row_tasks.numel() else 0
        uniform = row_tasks.numel() == 0 or bool((row_tasks == first).all())
        self.single = self.slots[first] if uniform and self.slots else None
        self._last = (row_tasks, version, self.single, self.version)

    def chain(self, task: str) -> tuple[str, ...]:
        """The tasks whose parameters a row of ``task`` runs through, bottom first: its components, then itself."""
        return (*self.components.get(task, ()), task)

    def clear(self) -> None:
        self.row_tasks = None
        self.single = None

    def rows_for(self, batch: int) -> torch.Tensor:
        """Row slots for an activation of batch size ``batch`` (generation may expand rows by a factor)."""
        assert self.row_tasks is not None  # internal invariant: layers only ask in a routed forward
        if batch == self.row_tasks.numel():
            return self.row_tasks
        return self.row_tasks.repeat_interleave(batch // self.row_tasks.numel())
