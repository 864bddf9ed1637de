"""(IA)^3 in the peft package's adapter format.

PEFT keys are ``base_model.model.{module path}.ia3_l``: our public keys with PEFT's prefix, the same
tensors and shapes ((out, 1) output scaling, (1, in) feed-forward). The config names the layers.

The two sides match feed-forward names differently: PEFT tests ``name.endswith(pattern)`` (no dot),
we test the pattern against the name or a dotted suffix, as target modules match on both sides. Export
therefore writes the task's own module patterns only when PEFT's rules give exactly the task's layers
and feed-forward layers with them, and the full module paths otherwise; import does the same check under
our rules. Which layers PEFT adapted is read from the tensors, so a regex ``target_modules`` imports too.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.interop.peft import PREFIX, PeftFormat, common_config, register_format
from multitune.methods.ia3 import IA3Config, default_modules, ia3_layers, matches, plan
from multitune.methods.wrap import TaskLinear


def _module_names(bank: MultiTaskModel) -> list[str]:
    """The base's module paths as PEFT sees them: without our wrappers' internals."""
    names: list[str] = []
    wrapped: list[str] = []
    for name, module in bank.base.model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, TaskLinear):
            wrapped.append(name)
        names.append(name)
    return names


def _peft_targets(name: str, targets: list[str]) -> bool:
    return name in targets or any(name.endswith("." + t) for t in targets)


def _peft_feedforward(name: str, feedforward: list[str] | str | None) -> bool:
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(f) for f in feedforward or ())


def _export(bank: MultiTaskModel, task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    layers = {name: layer.feedforward[task] for name, layer in ia3_layers(bank, task)}
    cfg = IA3Config(**bank.tasks[task].config)
    default_targets, default_feedforward = default_modules(bank) or ((), ())
    targets = list(cfg.target_modules or default_targets)
    feedforward = list(
        cfg.feedforward_modules if cfg.feedforward_modules is not None else default_feedforward
    )
    feedforward = [f for f in feedforward if any(ff and matches(n, [f]) for n, ff in layers.items())]
    same = (
        {n for n in _module_names(bank) if _peft_targets(n, targets)} == set(layers)
        and all(_peft_feedforward(n, feedforward) == ff for n, ff in layers.items())
        and set(feedforward) <= set(targets)  # PEFT refuses feed-forward names outside target_modules
    )
    if not same:
        targets, feedforward = sorted(layers), sorted(n for n, ff in layers.items() if ff)
    config = {
        **common_config(bank, "IA3"),
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in ia3_layers(bank, task)),
        "init_ia3_weights": True,
        "exclude_modules": None,
        "modules_to_save": None,
    }
    own = bank.task_state_dict(task)
    return {PREFIX + k: v for k, v in own.items() if k.endswith(".ia3_l")}, config


def _to_ours(
    bank: MultiTaskModel, cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    ours = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        name = name.removesuffix(".default") if name.endswith(".ia3_l.default") else name
        if not name.endswith(".ia3_l"):
            raise ConfigError(
                f"unexpected tensor {key} in a PEFT IA3 adapter (expected keys ending in .ia3_l)"
            )
        ours[name] = value
    layers = [k.removesuffix(".ia3_l") for k in ours]
    raw_feedforward = cfg.get("feedforward_modules")
    if raw_feedforward is None:
        defaults = default_modules(bank)
        feedforward_layers = {n for n in layers if defaults and matches(n, defaults[1])}
    else:
        feedforward_layers = {n for n in layers if _peft_feedforward(n, raw_feedforward)}
    raw_targets = cfg.get("target_modules")
    candidate = IA3Config(
        target_modules=list(raw_targets) if isinstance(raw_targets, list) else None,
        feedforward_modules=list(raw_feedforward) if isinstance(raw_feedforward, list) else None,
    )
    try:
        same = (
            candidate.target_modules is not None
            and candidate.feedforward_modules is not None
            and plan(bank, candidate) == {n: n in feedforward_layers for n in layers}
        )
    except ConfigError:
        same = False
    config = (
        candidate
        if same
        else IA3Config(target_modules=sorted(layers), feedforward_modules=sorted(feedforward_layers))
    )
    return config, ours


register_format(PeftFormat("ia3", "IA3", _export, _to_ours))
