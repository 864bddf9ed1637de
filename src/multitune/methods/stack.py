"""Per-task tensors of one hook point, stacked for mixed batches: the mechanism every method shares.

A batch whose rows belong to different tasks needs, at each hook point, every row's own tensors (its
LoRA A and B, its (IA)^3 vector, its adapter, its soft prompt, its prefixes). Every method gets them the
same way, in three steps that :class:`SlotStack` does once for all of them:

1. **stack** the tensors of the T tasks that have parameters at this hook, padded to one shape (the method's
   ``build`` decides the padding: ranks to the largest, prompts right-aligned to the longest), with
   ``where`` (S,): each of the bank's S slots' index into the stack, -1 for slots whose rows pass through;
2. **cache** the stack while no gradient is needed, until a task comes or goes, a task is merged, or a
   parameter is written in place (an optimizer step, a load: their version counters are in the key); while
   training it is rebuilt at every forward from the tasks of the batch only, so each task's gradient comes
   from its own rows and a task without rows in the batch gets none (not zeros: AdamW would still move it);
3. **gather** per row: each row's index into the stack, the rows that pass through left out (``idx``), the
   tensors picked for the others and cast to the batch's dtype; kept for as long as one routed batch lasts
   (every decoding step of ``generate`` and of the server's decode batch, which route the same rows).

The gathered rows are keyed by :attr:`Routing.batch`, a counter of routed batches, never by a tensor's
version counter: tensors made under ``torch.inference_mode()`` have none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch

from multitune.routing import Routing


@dataclass(frozen=True)
class Stack:
    """The stacked tensors of one hook: each entry (T, ...) or None, and ``where`` (S,) slot -> index or -1."""

    tensors: tuple[torch.Tensor | None, ...]
    where: torch.Tensor


@dataclass(frozen=True)
class Rows:
    """The rows of a batch that have parameters here: ``idx`` (N,) their positions (None: every row) and
    each stacked tensor picked for them, (N, ...) (None where the stack's entry is None)."""

    idx: torch.Tensor | None
    tensors: tuple[torch.Tensor | None, ...]

    def required(self) -> tuple[torch.Tensor, ...]:
        """:attr:`tensors` of a hook whose stack never holds None (LoRA's, the adapters'), typed so."""
        assert all(t is not None for t in self.tensors), "a stack entry that is never None was None"
        return cast(tuple[torch.Tensor, ...], self.tensors)


class SlotStack:
    """Stack, cache and gather the per-task tensors of one hook point (see the module docstring).

    ``build(present)`` returns the :class:`Stack` over the bank's current slots, or None when no task has
    parameters here; ``present`` is the set of the routed batch's tasks while a gradient is needed (only
    their tensors may join the graph; other slots pass through or get the identity), None otherwise.
    ``params()`` gives the tensors whose in-place version counters key the cache. The owner calls
    :meth:`invalidate` whenever its tasks change (added, removed, merged, unmerged).
    """

    def __init__(
        self,
        routing: Routing,
        build: Callable[[set[str] | None], Stack | None],
        params: Callable[[], Iterable[torch.Tensor]],
    ) -> None:
        self.routing = routing
        self._build, self._params = build, params
        self._epoch = 0  # bumped by invalidate()
        self._stack: tuple[tuple[int, ...], Stack | None] | None = None
        self._rows: tuple[tuple[object, ...], Rows | None] | None = None

    def invalidate(self) -> None:
        self._epoch += 1
        self._stack = self._rows = None

    def stack(self) -> Stack | None:
        """The stack, cached between forwards that need no gradient."""
        if torch.is_grad_enabled():
            self._stack = self._rows = None
            rows = self.routing.row_tasks
            slots = self.routing.slots
            return self._build(set(slots) if rows is None else {slots[i] for i in rows.unique().tolist()})
        key = (self._epoch, self.routing.version, *(p._version for p in self._params()))
        if self._stack is None or self._stack[0] != key:
            self._stack, self._rows = (key, self._build(None)), None
        return self._stack[1]

    def rows(self, batch: int, dtype: torch.dtype) -> Rows | None:
        """The current routed batch's rows with parameters here, for an activation of ``batch`` rows
        (generation may repeat rows); None when none of them has any."""
        stack = self.stack()
        if stack is None:
            return None
        key = (self.routing.batch, batch, id(stack), dtype)
        if self._rows is not None and self._rows[0] == key and not torch.is_grad_enabled():
            return self._rows[1]
        index = stack.where[self.routing.rows_for(batch)]  # (B,) each row's index into the stack, -1: passes
        active = index >= 0
        idx = None if bool(active.all()) else active.nonzero(as_tuple=True)[0]
        out = None
        if idx is None or idx.numel():
            pick = index if idx is None else index[idx]
            out = Rows(idx, tuple(None if t is None else _cast(t[pick], dtype) for t in stack.tensors))
        if not torch.is_grad_enabled():
            self._rows = (key, out)
        return out


def slot_index(routing: Routing, tasks: Iterable[str], device: torch.device) -> torch.Tensor:
    """``where`` (S,) for a stack over ``tasks`` (in that order): each slot's index, -1 for other slots."""
    position = {t: i for i, t in enumerate(tasks)}
    return torch.tensor([position.get(t, -1) for t in routing.slots], dtype=torch.long, device=device)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def add_rows(y: torch.Tensor, rows: Rows, out: torch.Tensor) -> torch.Tensor:
    """``y`` plus ``out`` on the gathered rows; the other rows are left exactly as they are (in place when
    no graph needs ``y``)."""
    if rows.idx is None:
        return y + out
    return y.index_add_(0, rows.idx, out) if not torch.is_grad_enabled() else y.index_add(0, rows.idx, out)


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, k) -> (B, 1, ..., 1, k) to broadcast over the middle dimensions of ``like``."""
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])
