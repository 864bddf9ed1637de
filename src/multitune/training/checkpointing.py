"""Activation checkpointing of the base's transformer blocks (``--gradient-checkpointing``), correct for
routed rows and prefixes.

A checkpointed block keeps only its inputs in the forward pass and runs again in the backward pass to
rebuild what its gradient needs: activation memory falls from every block's intermediates to one block's,
for about one more forward. The base's own implementation (transformers' ``gradient_checkpointing_enable``)
cannot be used as it is, for two reasons the bank brings:

- **routing**: the wrappers (LoRA, (IA)^3, adapters) read which task each row belongs to from the bank's
  :class:`~multitune.routing.Routing`, which ``bank.routed`` sets for the forward only; the backward pass,
  where a block is recomputed, runs after it, when the rows are routed to nothing;
- **prefixes**: prefix tuning hands every block a cache that already holds its key/value positions;
  transformers' checkpointed layers drop the cache (``past_key_values=None``), and a block recomputed with
  it would append its keys to the cache a second time.

So the bank checkpoints the blocks itself, with torch's non-reentrant checkpoint, whose ``context_fn`` gives
one context for the forward and one for the recompute: the forward's records the routing of the rows and the
state of every cache layer the block can write; the recompute's puts both back while the block runs again
(with a fresh routed-batch number, so the wrappers build and gather their rows as they did in the forward:
the same saved tensors in the same order), then restores what was there. Dropout draws the same numbers in the
recompute (the checkpoint keeps the RNG state).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel
    from multitune.routing import Routing

_WRAPPED = "_multitune_checkpointed"


def _cache_objects(value: Any) -> list[Any]:
    """The cache objects a block can write: transformers' Cache layers (keys/values) and their holders."""
    found: list[Any] = []
    for name in ("self_attention_cache", "cross_attention_cache"):  # EncoderDecoderCache
        inner = getattr(value, name, None)
        if inner is not None:
            found.extend(_cache_objects(inner))
    layers = getattr(value, "layers", None)
    if isinstance(layers, list) and hasattr(value, "get_seq_length"):
        found.append(value)
        found.extend(layer for layer in layers if hasattr(layer, "keys") and hasattr(layer, "values"))
    elif found:
        found.append(value)  # the holder's own state (EncoderDecoderCache.is_updated)
    return found


def _copy(value: Any) -> Any:
    """Containers copied one level (a Cache's list of layers, EncoderDecoderCache.is_updated)."""
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def _state(objects: list[Any]) -> list[dict[str, Any]]:
    """A shallow copy of each object's attributes: the tensors a block's update replaces stay referenced."""
    return [{k: _copy(v) for k, v in vars(o).items()} for o in objects]


def _put(objects: list[Any], states: list[dict[str, Any]]) -> None:
    for obj, state in zip(objects, states, strict=True):
        vars(obj).clear()
        vars(obj).update({k: _copy(v) for k, v in state.items()})


def _contexts(routing: Routing, caches: list[Any]) -> tuple[Any, Any]:
    """Called by the checkpoint at the block's forward: what the recompute must see again."""
    rows = (routing.row_tasks, routing.single, routing.disabled)
    before = _state(caches)

    @contextmanager
    def recompute() -> Iterator[None]:
        saved = (routing.row_tasks, routing.single, routing.disabled)
        after = _state(caches)
        routing.row_tasks, routing.single, routing.disabled = rows
        routing.batch += 1  # never reused: the counter only grows
        routing._last = None  # the next routed batch is a new batch too
        _put(caches, before)
        try:
            yield
        finally:
            routing.row_tasks, routing.single, routing.disabled = saved
            _put(caches, after)

    return nullcontext(), recompute()


def _checkpointed(bank: MultiTaskModel, forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (bank.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        caches = [c for v in (*args, *kwargs.values()) for c in _cache_objects(v)]
        return checkpoint(
            forward,
            *args,
            use_reentrant=False,
            context_fn=lambda: _contexts(bank.routing, caches),
            **kwargs,
        )

    return run


def blocks(bank: MultiTaskModel) -> list[torch.nn.Module]:
    return [block for layers in bank.base.layer_lists() for block in layers]


@contextmanager
def checkpointed(bank: MultiTaskModel, enabled: bool = True) -> Iterator[None]:
    """Checkpoint every transformer block of the bank's base while inside (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    wrapped = []
    for block in blocks(bank):
        if _WRAPPED in vars(block):
            continue  # already checkpointed by an outer context
        block.forward = _checkpointed(bank, block.forward)
        setattr(block, _WRAPPED, True)
        wrapped.append(block)
    try:
        yield
    finally:
        for block in wrapped:
            del block.forward
            delattr(block, _WRAPPED)
