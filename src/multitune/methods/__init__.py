"""Adaptation methods and their registry.

Each method is one module in this package with one registration line::

    register(Method(name="lora", config_class=LoRAConfig, attach=attach, detach=detach, ...))

A method attaches a task's parameters to the bank's frozen base at its hook point (see
docs/architecture.md) and detaches them again; the bank does the rest (routing, heads, saving).

Checklist for adding a method (one file: nothing else names it):
1. ``methods/NAME.py`` with a dataclass config (field docs in ``metadata={"help": ...}``, a ``validate()``
   returning problems), ``attach`` and ``detach``; every tensor it creates is given to ``bank.own(task, key,
   param)``, so that ``bank.task_parameters(task)`` is exactly the task's parameters. Linear-layer methods wrap
   layers with a :class:`~multitune.methods.wrap.TaskLinear`; input-side methods keep their tensors in
   ``bank.store(NAME, ...)`` and add their rows' inputs through ``inputs``. Mixed batches stack and gather
   per-task tensors with :class:`~multitune.methods.stack.SlotStack`.
2. One ``register(Method(...))`` line at the end of that module, with its ``search`` space for compare;
   every module of this package is imported below.
3. That is all: the CLI flags, ``multitune methods``, compare's method list and search, and the tests'
   method x family matrix and mixed-batch pairs (tests/methods/test_methods.py, test_mixing.py) read the
   registry; tests/methods/test_toy_method.py shows a method added from one file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multitune.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from multitune.bank import ModelInputs, MultiTaskModel
    from multitune.data import Example


@dataclass(frozen=True)
class Method:
    """One adaptation method: how to attach a task's parameters to the base and take them off."""

    name: str
    config_class: type
    attach: Callable[[MultiTaskModel, str, Any], None]
    detach: Callable[[MultiTaskModel, str], None]
    summary: str
    changes_base: bool = False  # full fine-tuning: the task owns the base weights
    default_learning_rate: float = 1e-3
    # A parameter's learning rate as a multiple of the run's, by its key (None: 1 for all). Prefix tuning's
    # reparameterisation MLP learns at a fraction: AdamW moves each of its weights by about the learning rate,
    # and the MLP sums hundreds of them into every prefix value.
    learning_rate_scale: Callable[[str], float] | None = None
    # Folding a task into the base weights (single-task deployment) and taking it out again; None when
    # the method cannot be folded (soft prompts, prefixes, adapters with a nonlinearity).
    merge: Callable[[MultiTaskModel, str], None] | None = None
    unmerge: Callable[[MultiTaskModel, str], None] | None = None
    # Called when training ends, before saving: turn training-time parameters into what is served
    # (prefix tuning folds its reparameterisation MLP into plain prefixes).
    fold: Callable[[MultiTaskModel, str], None] | None = None
    # Methods with nothing to optimise (prompting). ``fit``: what training means (prompting keeps a shot
    # pool in the task's config). ``render``: raw examples -> the examples the model reads (templates),
    # applied before every encoding of the task's examples (multitune.encode.encode_task). ``score``:
    # classification logits (n, C) of the task's rows from their token ids and mask, instead of a head
    # (the bank gives such a task no head).
    fit: Callable[[MultiTaskModel, str, Sequence[Example]], None] | None = None
    render: Callable[[MultiTaskModel, str, Sequence[Example], int], list[Example]] | None = None
    score: Callable[[MultiTaskModel, str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Input-side methods (prompt, prefix). ``inputs``: add the batch rows' contribution to the model's inputs
    # (virtual embeddings, a cache holding positions before the text; see multitune.bank.ModelInputs); called
    # for every routed forward of a bank holding a task of the method. ``positions``: how many positions a
    # task's rows occupy before their text (context-length checks).
    inputs: Callable[[MultiTaskModel, ModelInputs], None] | None = None
    positions: Callable[[MultiTaskModel, str], int] | None = None
    # What ``multitune compare`` searches besides the learning rate and epochs (methods with ``fit``: instead of
    # them): an Optuna trial -> {"METHOD.field": value}; it may derive settings from the suggested ones (LoRA's
    # alpha from its rank), as it is also read back from a finished trial's parameters. ``compared``: whether
    # compare runs the method by default (the linear probe ``base`` is a baseline, not a method to compare).
    search: Callable[[Any], dict[str, Any]] | None = None
    compared: bool = True
    # ``saved``: the config a saved task is rebuilt with, from the config in its adapter.json and its tensors
    # (LoRA: an adapter saved before its targets were recorded adapts the layers its tensors name, whatever
    # today's default targets are); None: the recorded config as it is.
    saved: Callable[[Any, dict[str, torch.Tensor]], Any] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


HELPERS = ("wrap", "stack", "label_scores")  # modules of this package that are not methods


def _import_all() -> None:
    """Import every method module of this package: each registers itself."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in HELPERS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
