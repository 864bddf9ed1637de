"""Read and write the peft package's adapter folder format.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Each method that PEFT
also has registers a :class:`PeftFormat` here: how its tensors and config become PEFT's and back. LoRA
is below; the other formats live in ``interop/peft_{method}.py`` and register themselves.

LoRA keys are ``base_model.model.{module path}.lora_A.weight`` / ``.lora_B.weight``: our public keys
with PEFT's prefix. The conversion is a key rename; the tensors are identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from multitune.bank import MultiTaskModel, TaskKind
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.storage import atomic_dir

PREFIX = "base_model.model."


@dataclass(frozen=True)
class PeftFormat:
    """One method's conversion: ``export(bank, task) -> (tensors, config)`` and
    ``to_ours(bank, peft_config, tensors) -> (method config, tensors by our public keys)``."""

    method: str
    peft_type: str
    export: Callable[[MultiTaskModel, str], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    to_ours: Callable[[MultiTaskModel, dict[str, Any], dict[str, torch.Tensor]], tuple[Any, dict[str, torch.Tensor]]]


FORMATS: dict[str, PeftFormat] = {}  # by our method name


def register_format(fmt: PeftFormat) -> PeftFormat:
    FORMATS[fmt.method] = fmt
    return fmt


def _format_for_method(method: str) -> PeftFormat:
    if method not in FORMATS:
        raise ConfigError(f"the peft package has no format for method '{method}'; PEFT export covers "
                          f"{', '.join(sorted(FORMATS))}")
    return FORMATS[method]


def common_config(bank: MultiTaskModel, peft_type: str) -> dict[str, Any]:
    """The fields every PEFT config carries."""
    return {"peft_type": peft_type, "base_model_name_or_path": bank.base.source, "inference_mode": True,
            "task_type": None, "revision": None}


def export_peft(bank: MultiTaskModel, task: str, folder: str | Path) -> Path:
    """Write a folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads (the head, if any, is not
    part of PEFT's adapter)."""
    fmt = _format_for_method(bank.tasks[task].method)
    folder = Path(folder)
    state, config = fmt.export(bank, task)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def import_peft(bank: MultiTaskModel, folder: str | Path, task: str, kind: TaskKind = "generation",
                labels: list[str] | None = None) -> None:
    """Add a PEFT adapter folder to the bank as task ``task`` (a classification head starts untrained)."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{config_path} is not valid JSON ({error.msg} at line {error.lineno})") from error
    by_type = {f.peft_type: f for f in FORMATS.values()}
    peft_type = cfg.get("peft_type")
    if peft_type not in by_type:
        raise ConfigError(f"{folder} holds a PEFT {peft_type} adapter; import covers {', '.join(sorted(by_type))}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder} has no adapter_model.safetensors (a .bin adapter would need pickle, which "
                          "multitune never loads); re-save it with safe_serialization=True")
    fmt = by_type[peft_type]
    config, ours = fmt.to_ours(bank, cfg, load_file(str(weights)))
    bank.add_task(task, kind, fmt.method, config, labels)
    try:
        heads = {k: v.detach() for k, v in bank.task_parameters(task).items() if k.startswith("head.")}
        bank.load_task_state_dict(task, {**ours, **heads})
    except ConfigError:
        bank.remove_task(task)
        raise


# ---- LoRA ------------------------------------------------------------------------------------------
def _lora_export(bank: MultiTaskModel, task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg = LoRAConfig(**bank.tasks[task].config)
    own = bank.task_state_dict(task)
    modules = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in own if ".lora_" in k})
    config = {
        **common_config(bank, "LORA"), "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": bank.base.family.name == "gpt2",
    }
    return {PREFIX + k: v for k, v in own.items() if ".lora_" in k}, config


def _lora_to_ours(bank: MultiTaskModel, cfg: dict[str, Any],
                  state: dict[str, torch.Tensor]) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    targets = cfg.get("target_modules")
    config = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                        target_modules=[targets] if isinstance(targets, str) else list(targets),
                        rslora=bool(cfg.get("use_rslora", False)))
    ours = {key.removeprefix(PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for key, v in state.items()}
    return config, ours


register_format(PeftFormat("lora", "LORA", _lora_export, _lora_to_ours))


def to_peft_state_dict(bank: MultiTaskModel, task: str) -> dict[str, torch.Tensor]:
    """The task's tensors under PEFT's key names."""
    return _format_for_method(bank.tasks[task].method).export(bank, task)[0]


def _import_all() -> None:
    import importlib
    import pkgutil

    from multitune import interop

    for info in pkgutil.iter_modules(interop.__path__):
        if info.name.startswith("peft_"):
            importlib.import_module(f"multitune.interop.{info.name}")


_import_all()
