"""Per-task wrappers of linear layers, and how several methods share one layer.

LoRA, (IA)^3 and bottleneck adapters all attach at linear layers. Each method has one wrapper class
(a :class:`TaskLinear`) that holds the per-task tensors of every task of that method at that layer.
Wrappers of different methods on the same layer form a chain through ``base_layer``::

    v_proj = IA3Linear(base_layer=LoRALinear(base_layer=Linear))

Each batch row belongs to one task, and a wrapper passes the rows of other tasks through unchanged, so
the order of the chain never changes a result. :func:`wrapper_for` finds or inserts a method's wrapper
in a chain; :func:`drop_if_empty` takes it out again when its last task leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from multitune.errors import ConfigError
from multitune.routing import Routing

LINEAR = (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit and Linear8bitLt (a quantized base) are nn.Linear


class TaskLinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, a bitsandbytes 4/8-bit one, or GPT-2's ``Conv1D``, possibly
    already wrapped) plus tasks."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        inner = innermost(base_layer)
        # GPT-2's Conv1D stores its weight as (in, out): the transpose of nn.Linear's.
        self.fan_in_fan_out = isinstance(inner, Conv1D)
        if isinstance(inner, nn.Linear):  # a 4-bit base's weight is packed: its shape is not the layer's
            self.out_features, self.in_features = inner.out_features, inner.in_features
        else:
            shape = weight_of(inner).shape
            self.out_features, self.in_features = shape[::-1] if self.fan_in_fan_out else shape

    @property
    def weight(self) -> torch.Tensor:  # models read their layers' weight (T5 checks its dtype)
        return weight_of(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def task_names(self) -> list[str]:
        raise NotImplementedError

    def remove_task(self, task: str) -> None:
        raise NotImplementedError


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, TaskLinear):
        module = module.base_layer
    return module


def weight_of(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` of a linear layer, a norm, an embedding or a wrapper, typed as the tensor it is.

    ``nn.Module.__getattr__`` is typed ``Tensor | Module`` for every attribute it finds.
    """
    return cast(torch.Tensor, layer.weight)


W = TypeVar("W", bound=TaskLinear)


def _chain(module: nn.Module) -> list[nn.Module]:
    chain = [module]
    while isinstance(chain[-1], TaskLinear):
        chain.append(chain[-1].base_layer)
    return chain


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (wrapping a layer or unwrapping it)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrapper_for(model: nn.Module, name: str, cls: type[W], routing: Routing, training: bool) -> W:
    """The ``cls`` wrapper of layer ``name``: the one in its chain, or a new outermost one."""
    module = model.get_submodule(name)
    for link in _chain(module):
        if isinstance(link, cls):
            return link
    wrapper = cls(module, routing)
    wrapper.train(training)
    replace_module(model, name, wrapper)
    return wrapper


def drop_if_empty(model: nn.Module, name: str, wrapper: TaskLinear) -> None:
    """Take ``wrapper`` out of layer ``name``'s chain when it holds no task any more."""
    if wrapper.task_names():
        return
    outer: nn.Module | None = None
    for link in _chain(model.get_submodule(name)):
        if link is wrapper:
            break
        outer = link
    if outer is None:
        replace_module(model, name, wrapper.base_layer)
    else:
        outer.base_layer = wrapper.base_layer


def remove_from_layers(model: nn.Module, cls: type[TaskLinear], task: str) -> None:
    """Take ``task`` out of every ``cls`` wrapper and drop the wrappers left empty (a method's detach)."""
    for name, layer in layers_of(model, cls, task):
        layer.remove_task(task)
        drop_if_empty(model, name, layer)


def layers_of(model: nn.Module, cls: type[W], task: str) -> list[tuple[str, W]]:
    """(outermost layer name, wrapper) for every ``cls`` wrapper that holds ``task``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, TaskLinear) and not name.endswith(".base_layer") and ".base_layer." not in name:
            for link in _chain(module):
                if isinstance(link, cls) and task in link.task_names():
                    found.append((name, link))
    return found


def find_linear(
    model: nn.Module,
    targets: list[str] | tuple[str, ...],
    skip: set[str],
    flag: str,
    blocks: Sequence[nn.Module] = (),
) -> list[str]:
    """Names of the linear layers (wrapped or not) whose name or dotted suffix matches a target.

    ``["all-linear"]`` means every linear layer of the transformer ``blocks`` (every one but those in
    ``skip``, the LM head, when no blocks are given): a layer outside them, such as BERT's pooler, never
    reaches a task's output here (classification pools the last hidden states), so a method's tensors on
    it would get no gradient. A target that matches nothing is an error naming the model's linear layers
    and the flag to fix it.
    """
    names = [
        n
        for n, m in model.named_modules()
        if ".base_layer" not in n and n not in skip and isinstance(innermost(m), LINEAR)
    ]
    if list(targets) == ["all-linear"]:
        if not blocks:
            return names
        inside = {id(m) for block in blocks for m in block.modules()}
        return [n for n in names if id(model.get_submodule(n)) in inside]
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in matched)]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(
            f"target modules {', '.join(missing)} not found in the base model; its linear layers are "
            f"named: {', '.join(known)}. Pass {flag} with some of those"
        )
    return matched
