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

**Stacked tasks** (``train --stack-on``, :mod:`multitune.compose.stack`): a row of a stacked task runs
through its components' parameters too (:meth:`Routing.chain`, bottom first). A hook whose stack holds one
entry per task gets ``where`` (K, S): level k maps each slot to the k-th member of its chain that has
parameters here (-1: none), and the hook applies its levels in order (LoRA's deltas add, adapters chain,
prompts and prefixes concatenate). Banks without a stacked task have K = 1. Hooks whose stack holds one
entry per slot ((IA)^3's scales, the adapters' task norms) combine a slot's chain in that entry instead.
While training, the tasks of the batch's chains join the build, so a component's (frozen) tensors are in
the forward but receive no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

import torch

from multitune.routing import Routing


@dataclass(frozen=True)
class Stack:
    """The stacked tensors of one hook: each entry (T, ...) or None, and ``where`` (S,) slot -> index or -1,
    or (K, S) with one row per level of stacked tasks (see the module docstring)."""

    tensors: tuple[torch.Tensor | None, ...]
    where: torch.Tensor


@dataclass(frozen=True)
class Rows:
    """The rows of a batch that have parameters here: ``idx`` (N,) their positions (None: every row) and
    each stacked tensor picked for them, (N, ...) (None where the stack's entry is None)."""

    idx: torch.Tensor | None
    tensors: tuple[torch.Tensor | None, ...]
    # makes what the hook's ``prepare`` turns these rows into (no gradient only); see :meth:`prepared`
    make: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    _made: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def prepared(self) -> Any:
        """What the hook's ``prepare`` makes of these rows: made at the first ask and kept as long as the rows
        are (one routed batch), so a batch that never asks (a prefill, a training forward) never pays for it.
        None without a ``prepare`` or when it declines."""
        if self.make is None:
            return None
        if "value" not in self._made:
            self._made["value"] = self.make()
        return self._made["value"]

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

    ``prepare(stack, index, dtype)``, when given, turns one level's gathered rows into what the hook computes with
    instead of per-row tensors (LoRA's concatenated factors of the batch's tasks and a row mask): called once
    per routed batch with each row's index into the stack (-1: passes through), no gradient needed, its
    result from :meth:`Rows.prepared`, made only when a hook asks for it (a decode-sized input).
    """

    def __init__(
        self,
        routing: Routing,
        build: Callable[[set[str] | None], Stack | None],
        params: Callable[[], Iterable[torch.Tensor]],
        prepare: Callable[[Stack, torch.Tensor, torch.dtype], Any] | None = None,
    ) -> None:
        self.routing = routing
        self._build, self._params, self._prepare = build, params, prepare
        self._epoch = 0  # bumped by invalidate()
        self._stack: tuple[tuple[int, ...], Stack | None] | None = None
        self._rows: tuple[tuple[object, ...], list[Rows | None]] | None = None
        # the tensors ``params()`` gave, kept until the tasks change: reading version counters off a tuple
        # costs a fraction of walking the owner's ParameterDicts, which every hook would do at every step
        self._tensors: tuple[tuple[int, int], tuple[torch.Tensor, ...]] | None = None
        self._fast: tuple[tuple[object, ...], list[Rows | None]] | None = None  # see levels()

    def invalidate(self) -> None:
        self._epoch += 1
        self._stack = self._rows = self._tensors = self._fast = None

    def _versions(self) -> tuple[int, ...]:
        tag = (self._epoch, self.routing.version)
        if self._tensors is None or self._tensors[0] != tag:
            self._tensors = (tag, tuple(self._params()))
        return tuple(p._version for p in self._tensors[1])

    def stack(self) -> Stack | None:
        """The stack, cached between forwards that need no gradient."""
        if torch.is_grad_enabled():
            self._stack = self._rows = self._fast = None
            rows = self.routing.row_tasks
            slots = self.routing.slots
            present = slots if rows is None else [slots[i] for i in rows.unique().tolist()]
            return self._build({t for task in present for t in self.routing.chain(task)})
        key = (self._epoch, self.routing.version, *self._versions())
        if self._stack is None or self._stack[0] != key:
            self._stack, self._rows = (key, self._build(None)), None
        return self._stack[1]

    def rows(self, batch: int, dtype: torch.dtype) -> Rows | None:
        """The current routed batch's rows with parameters here, for an activation of ``batch`` rows
        (generation may repeat rows); None when none of them has any. A hook with levels reads
        :meth:`levels` instead."""
        return self.levels(batch, dtype)[0]

    def levels(self, batch: int, dtype: torch.dtype) -> list[Rows | None]:
        """:meth:`rows` for each level of the stack (one unless a stacked task has several members here),
        bottom first; ``[None]`` when no task has parameters here.

        Without a gradient, what one routing found is kept for the forwards inside it (every decoding step of
        ``generate``): parameters are not written in place in the middle of one routed call, so the stack's
        version check runs once per routing, not once per forward.
        """
        grad = torch.is_grad_enabled()
        routing = self.routing
        fast = self._fast
        if not grad and fast is not None and fast[0] == (routing.entry, batch, dtype):
            return fast[1]
        stack = self.stack()
        if stack is None:
            out: list[Rows | None] = [None]
        else:
            key = (routing.batch, batch, id(stack), dtype)
            if self._rows is not None and self._rows[0] == key and not grad:
                out = self._rows[1]
            else:
                slots = routing.rows_for(batch)
                where = stack.where.view(-1, stack.where.shape[-1])
                out = [_gather(stack, level[slots], dtype) for level in where]
                if not grad:
                    if self._prepare is not None:
                        out = [
                            None
                            if rows is None
                            else replace(rows, make=partial(self._prepare, stack, level[slots], dtype))
                            for rows, level in zip(out, where, strict=True)
                        ]
                    self._rows = (key, out)
        if not grad:
            self._fast = ((routing.entry, batch, dtype), out)
        return out


def _gather(stack: Stack, index: torch.Tensor, dtype: torch.dtype) -> Rows | None:
    """The rows whose ``index`` (B,) into the stack is not -1, and their tensors; None when there are none."""
    active = index >= 0
    idx = None if bool(active.all()) else active.nonzero(as_tuple=True)[0]
    if idx is not None and not idx.numel():
        return None
    pick = index if idx is None else index[idx]
    return Rows(idx, tuple(None if t is None else _cast(t[pick], dtype) for t in stack.tensors))


# Positions per row up to which a mixed batch takes concatenated factors (decode steps: one; see
# :func:`concatenated`), and the most multiply-adds they may cost, as a fraction of the wrapped layer's.
DENSE_POSITIONS = 4
DENSE_FLOPS = 1.0


@dataclass(frozen=True)
class Dense:
    """The tasks of a routed batch at one low-rank hook (LoRA, bottleneck adapters), concatenated: ``down``
    (P R, in) the P present tasks' down factors, ``up`` (P R, out) their up factors transposed, ``mask`` (B, P R)
    which of the P R columns belong to each row's task (none for a row without parameters here), and the
    gathered per-row tensors a hook adds besides (an adapter's down bias (P R,) and up bias per row (B, out))."""

    down: torch.Tensor
    up: torch.Tensor
    mask: torch.Tensor
    down_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None


def concatenated(
    index: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    layer_in: int,
    layer_out: int,
    dtype: torch.dtype,
    ranks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Dense] | None:
    """Per-row low-rank products of a decode step as two dense GEMMs: one over the concatenated down factors of
    the tasks present in the batch, a row mask, one over the concatenated up factors (punica/S-LoRA's segment
    idea without custom kernels). ``down`` (T, R, in) and ``up`` (T, out, R) are the stack's, ``index`` (B,)
    each row's entry in it (-1: none), ``ranks`` (T,) each entry's own rank when they differ (the stack pads
    to the largest; the padding is left out here, so a batch of r8 and r16 tasks costs 24 columns, not 32).
    Returns the present entries (P,) and the :class:`Dense`, or None when the R' (in + out) multiply-adds
    every row then pays (R' the present entries' ranks summed) pass ``DENSE_FLOPS`` times the wrapped
    layer's in x out: with many distinct tasks in a batch, per-row factors do less work.

    Measured at decode steps (SmolLM2's 576 x 576 and 576 x 1536 layers, 32 rows of one token, 2 CPU cores,
    LoRA): concatenated factors cost 25-95 us over the base layer for P R <= 128 where per-row factors
    (gather + bmm + index_add) cost 100-310 us; the two break even near P R = 512 (32 distinct r16 tasks),
    where that ratio passes 1. A prefill's many positions per row turn it around (per-row factors do a P-th
    of the FLOPs), hence ``DENSE_POSITIONS``.
    """
    present = index[index >= 0].unique()  # (P,) sorted
    rank = down.shape[1]
    own = torch.full_like(present, rank) if ranks is None else ranks[present]  # (P,)
    if int(own.sum()) * (down.shape[2] + up.shape[1]) > DENSE_FLOPS * layer_in * layer_out:
        return None
    kept = torch.arange(rank, device=index.device)[None, :] < own[:, None]  # (P, R): no padding
    mask = (index[:, None] == present[None, :]).repeat_interleave(rank, dim=1)[:, kept.reshape(-1)]  # (B, R')
    return present, Dense(
        down[present][kept].to(dtype).contiguous(),  # (R', in)
        up[present].transpose(1, 2)[kept].to(dtype).contiguous(),  # (R', out)
        mask.to(dtype),
    )


def dense_pays(x: torch.Tensor) -> bool:
    """Whether an activation (B, ..., features) is decode-sized: at most ``DENSE_POSITIONS`` positions per row."""
    return x.numel() <= DENSE_POSITIONS * x.shape[0] * x.shape[-1]


def masked(low: torch.Tensor, rows: int, mask: torch.Tensor) -> torch.Tensor:
    """``low`` (B L, P R) with each row's columns of other tasks zeroed, in place."""
    if low.shape[0] == rows:
        return low.mul_(mask)
    low.view(rows, -1, low.shape[-1]).mul_(mask.unsqueeze(1))
    return low


def slot_index(routing: Routing, tasks: Iterable[str], device: torch.device) -> torch.Tensor:
    """``where`` (K, S) for a stack over ``tasks`` (in that order): row k holds each slot's index of the k-th
    member of its chain among ``tasks`` (a plain task's chain is itself: K = 1), -1 where there is none."""
    position = {t: i for i, t in enumerate(tasks)}
    chains = [[position[t] for t in routing.chain(slot) if t in position] for slot in routing.slots]
    levels = max([1, *map(len, chains)])
    table = [[c[k] if k < len(c) else -1 for c in chains] for k in range(levels)]
    return torch.tensor(table, dtype=torch.long, device=device).view(levels, len(routing.slots))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def add_rows(y: torch.Tensor, rows: Rows, out: torch.Tensor) -> torch.Tensor:
    """``y`` plus ``out`` on the gathered rows; the other rows are left exactly as they are (in place when
    no graph needs ``y``)."""
    if rows.idx is None:
        return y + out
    return y.index_add_(0, rows.idx, out) if not torch.is_grad_enabled() else y.index_add(0, rows.idx, out)


def join_right(blocks: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row virtual positions of each level (B, W_k, ...) with their masks (B, W_k) joined into one (B, W, ...)
    block: each row's positions in level order, contiguous and right-aligned, the masked ones first.

    Contiguity matters for models with relative positions (T5's bias reads the distance between positions, so
    a masked gap between a component's prompt and the task's would move the component's away from the text).
    """
    if len(blocks) == 1:
        return blocks[0], masks[0]
    block, mask = torch.cat(blocks, dim=1), torch.cat(masks, dim=1)
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # masked first, the rest in level order
    picked = order.view(*order.shape, *([1] * (block.dim() - 2))).expand_as(block)
    return block.gather(1, picked), mask.gather(1, order)


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, k) -> (B, 1, ..., 1, k) to broadcast over the middle dimensions of ``like``."""
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])
