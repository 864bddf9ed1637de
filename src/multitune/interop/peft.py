"""Read and write the peft package's adapter folder format (LoRA).

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.{module path}.lora_A.weight`` / ``.lora_B.weight``: our public keys with PEFT's
prefix. The conversion is a key rename; the tensors are identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from multitune.bank import MultiTaskModel, TaskKind
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.storage import atomic_dir

PREFIX = "base_model.model."


def to_peft_state_dict(bank: MultiTaskModel, task: str) -> dict[str, Any]:
    """The task's LoRA tensors under PEFT's key names (the head, if any, is not part of PEFT's LoRA)."""
    if bank.tasks[task].method != "lora":
        raise ConfigError(f"task '{task}' uses {bank.tasks[task].method}; PEFT export covers LoRA here")
    return {PREFIX + k: v for k, v in bank.task_state_dict(task).items() if ".lora_" in k}


def peft_config(bank: MultiTaskModel, task: str) -> dict[str, Any]:
    cfg = LoRAConfig(**bank.tasks[task].config)
    modules = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in bank.task_parameters(task) if ".lora_" in k})
    return {
        "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": bank.base.family.name == "gpt2", "base_model_name_or_path": bank.base.source,
        "task_type": None, "inference_mode": True,
    }


def export_peft(bank: MultiTaskModel, task: str, folder: str | Path) -> Path:
    """Write a folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads."""
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in to_peft_state_dict(bank, task).items()}
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(bank, task), indent=2))
    return folder


def import_peft(bank: MultiTaskModel, folder: str | Path, task: str, kind: TaskKind = "generation",
                labels: list[str] | None = None) -> None:
    """Add a PEFT LoRA folder to the bank as task ``task``."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(config_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{folder} holds a PEFT {cfg.get('peft_type')} adapter; import covers LORA here")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder} has no adapter_model.safetensors (a .bin adapter would need pickle, which "
                          "multitune never loads); re-save it with safe_serialization=True")
    state = load_file(str(weights))
    targets = cfg.get("target_modules")
    config = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                        target_modules=[targets] if isinstance(targets, str) else list(targets),
                        rslora=bool(cfg.get("use_rslora", False)))
    bank.add_task(task, kind, "lora", config, labels)
    ours = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        ours[name] = value
    own = bank.task_parameters(task)
    heads = {k: v for k, v in own.items() if k.startswith("head.")}
    bank.load_task_state_dict(task, {**ours, **{k: v.detach() for k, v in heads.items()}})
