"""What each method would cost on a given base: trainable parameters and bytes stored per task.

Counted, not estimated: each method is attached to the real base with its default settings as a probe
task, its parameters are counted (after folding, for what is stored), and the probe is removed.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from multitune.bank import MultiTaskModel, TaskKind
from multitune.config import setting_fields
from multitune.errors import MultituneError
from multitune.flags import field_default, setting_help
from multitune.methods import METHODS, Method
from multitune.models import Base


@dataclass
class Setting:
    flag: str
    default: object
    help: str


@dataclass
class MethodFacts:
    name: str
    summary: str
    settings: list[Setting] = field(default_factory=list)
    trainable: int | None = None  # parameters trained (the classification head included)
    stored: int | None = None  # parameters saved per task (after folding)
    stored_bytes: int | None = None
    problem: str | None = None  # why the method does not apply to this model and kind


def settings_of(method: Method) -> list[Setting]:
    """The method's flags, as ``multitune train --help`` lists them (internal state such as prompting's shot
    pool is not a setting); ``help`` ends with the default, shown as it would be typed."""
    out = []
    for f in setting_fields(method.config_class):
        flag = f"--{method.name}-{f.name.replace('_', '-')}"
        if f.type is bool:
            flag += f" / --no-{method.name}-{f.name.replace('_', '-')}"
        is_list = any(typing.get_origin(m) is list for m in typing.get_args(f.type) or [f.type])
        out.append(
            Setting(
                flag, field_default(f), setting_help(f.metadata.get("help", ""), field_default(f), is_list)
            )
        )
    return out


def method_facts(
    base: Base | None, kind: TaskKind = "classification", num_labels: int = 2
) -> list[MethodFacts]:
    """One entry per registered method; counts on ``base`` when given (the base is left as it was)."""
    facts = []
    for name, method in sorted(METHODS.items()):
        fact = MethodFacts(name, method.summary, settings_of(method))
        if base is not None:
            bank = MultiTaskModel(base)
            labels = [f"label{i}" for i in range(num_labels)] if kind == "classification" else None
            try:
                bank.add_task("probe", kind, name, method.config_class(), labels)
            except MultituneError as error:
                fact.problem = " ".join(str(error).split())
            else:
                fact.trainable = sum(p.numel() for p in bank.task_parameters("probe").values())
                if method.fold is not None:
                    method.fold(bank, "probe")
                stored = bank.task_parameters("probe").values()
                fact.stored = sum(p.numel() for p in stored)
                fact.stored_bytes = sum(p.numel() * p.element_size() for p in stored)
                bank.remove_task("probe")
        facts.append(fact)
    return facts


def base_parameters(base: Base) -> int:
    return sum(p.numel() for p in base.model.parameters())
