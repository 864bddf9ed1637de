"""A whole adaptation method in one file, as a user would add one: a learned per-task bias on chosen linear
layers' outputs (``y = W x + b_t``). Importing this module registers it; nothing else names it.

Used by tests/methods/test_toy_method.py to show that the registry is all a method needs: trained, mixed with
other methods in one batch, compared and listed, with its flags on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from multitune.methods import Method, register
from multitune.methods.stack import SlotStack, Stack, add_rows, slot_index
from multitune.methods.wrap import TaskLinear, find_linear, remove_from_layers, wrapper_for
from multitune.routing import Routing

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel


@dataclass
class ToyConfig:
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "layers to add a bias to"}
    )
    init: float = field(default=0.0, metadata={"help": "the biases' starting value"})

    def validate(self) -> list[str]:
        return (
            [] if self.targets else ["toy targets must name at least one layer; try --toy-targets all-linear"]
        )


class ToyLinear(TaskLinear):
    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__(base_layer, routing)
        self.bias_t = nn.ParameterDict()
        self.stacked = SlotStack(routing, self._stack, lambda: self.bias_t.values())

    def task_names(self) -> list[str]:
        return list(self.bias_t)

    def add_task(self, task: str, init: float) -> nn.Parameter:
        self.bias_t[task] = nn.Parameter(torch.full((self.out_features,), init))
        self.stacked.invalidate()
        return self.bias_t[task]

    def remove_task(self, task: str) -> None:
        del self.bias_t[task]
        self.stacked.invalidate()

    def _stack(self, present: set[str] | None) -> Stack | None:
        tasks = [t for t in self.routing.slots if t in self.bias_t and (present is None or t in present)]
        if not tasks:
            return None
        device = self.bias_t[tasks[0]].device
        return Stack((torch.stack([self.bias_t[t] for t in tasks]),), slot_index(self.routing, tasks, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routing = self.routing
        if routing.disabled or routing.row_tasks is None or not self.bias_t:
            return y
        if routing.single is not None:
            return y + self.bias_t[routing.single].to(y.dtype) if routing.single in self.bias_t else y
        rows = self.stacked.rows(y.shape[0], y.dtype)
        if rows is None:
            return y
        bias = rows.tensors[0]  # (N, out)
        picked = y if rows.idx is None else y.index_select(0, rows.idx)
        return add_rows(
            y, rows, torch.zeros_like(picked) + bias.view(bias.shape[0], *([1] * (y.dim() - 2)), -1)
        )


def attach(bank: MultiTaskModel, task: str, config: ToyConfig) -> None:
    model = bank.base.model
    for name in find_linear(model, config.targets, bank.output_layer_names(), "--toy-targets"):
        layer = wrapper_for(model, name, ToyLinear, bank.routing, bank.training)
        bank.own(task, f"{name}.toy_bias", layer.add_task(task, config.init))


def detach(bank: MultiTaskModel, task: str) -> None:
    remove_from_layers(bank.base.model, ToyLinear, task)


def search(trial: Any) -> dict[str, Any]:
    return {"toy.init": trial.suggest_categorical("toy.init", [0.0, 0.01])}


METHOD = register(
    Method(
        name="toy",
        config_class=ToyConfig,
        attach=attach,
        detach=detach,
        summary="a learned bias per task on linear layers' outputs (a test's toy method)",
        default_learning_rate=1e-2,
        search=search,
    )
)
