"""Read and write the peft package's adapter folder format.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Each method that PEFT
also has registers a :class:`PeftFormat` here: how its tensors and config become PEFT's and back. LoRA
is below; the other formats live in ``interop/peft_{method}.py`` and register themselves.

LoRA keys are ``base_model.model.{module path}.lora_A.weight`` / ``.lora_B.weight`` (and, for a DoRA task,
``use_dora: true`` with ``.lora_magnitude_vector``): our public keys with PEFT's prefix. The conversion is
a key rename; the tensors are identical.

A classification task's head is not part of a PEFT adapter (ours reads a pooled hidden state, PEFT's
``modules_to_save`` heads are the model's own). Export writes it beside PEFT's files, which PEFT ignores:
``multitune_task.json`` (kind, labels, pooling) and ``multitune_head.safetensors``; import reads them back,
so a classification task survives the round trip. For a folder without them the kind comes from PEFT's
``task_type`` where it tells (SEQ_CLS; CAUSAL_LM, SEQ_2_SEQ_LM), else from the base (an encoder can only
classify), and a classification import needs its labels given (its head then starts untrained).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from multitune.bank import MultiTaskModel, TaskKind, TaskSpec
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.methods.wrap import find_linear
from multitune.storage import atomic_dir

PREFIX = "base_model.model."
TASK_FILE = "multitune_task.json"  # beside PEFT's files: what a classification task needs besides the adapter
HEAD_FILE = "multitune_head.safetensors"
KINDS_BY_TASK_TYPE: dict[str, TaskKind] = {
    "SEQ_CLS": "classification",
    "CAUSAL_LM": "generation",
    "SEQ_2_SEQ_LM": "generation",
}


@dataclass(frozen=True)
class PeftFormat:
    """One method's conversion: ``export(bank, task) -> (tensors, config)`` and
    ``to_ours(bank, peft_config, tensors) -> (method config, tensors by our public keys)``."""

    method: str
    peft_type: str
    export: Callable[[MultiTaskModel, str], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    to_ours: Callable[
        [MultiTaskModel, dict[str, Any], dict[str, torch.Tensor]], tuple[Any, dict[str, torch.Tensor]]
    ]


FORMATS: dict[str, PeftFormat] = {}  # by our method name


def register_format(fmt: PeftFormat) -> PeftFormat:
    FORMATS[fmt.method] = fmt
    return fmt


def _format_for_method(method: str) -> PeftFormat:
    if method not in FORMATS:
        raise ConfigError(
            f"the peft package has no format for method '{method}'; PEFT export covers "
            f"{', '.join(sorted(FORMATS))}"
        )
    return FORMATS[method]


def common_config(bank: MultiTaskModel, peft_type: str) -> dict[str, Any]:
    """The fields every PEFT config carries."""
    return {
        "peft_type": peft_type,
        "base_model_name_or_path": bank.base.source,
        "inference_mode": True,
        "task_type": None,
        "revision": None,
    }


def export_peft(bank: MultiTaskModel, task: str, folder: str | Path) -> Path:
    """Write a folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads (the head, if any, is not
    part of PEFT's adapter). A stacked task of LoRA on LoRA exports as the one LoRA it equals
    (:func:`multitune.compose.stack.flatten_lora`); other stacks have no PEFT form."""
    if bank.tasks[task].stack_on is not None:
        from multitune.compose.stack import flatten_lora

        flat = flatten_lora(bank, task, f"{task[:56]}-flat")
        try:
            return export_peft(bank, flat, folder)
        finally:
            bank.remove_task(flat)
    fmt = _format_for_method(bank.tasks[task].method)
    folder = Path(folder)
    state, config = fmt.export(bank, task)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    spec = bank.tasks[task]
    head = {
        k: v.detach().to("cpu").contiguous()
        for k, v in bank.task_state_dict(task).items()
        if k.startswith("head.")
    }
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if spec.kind == "classification":
            (tmp / TASK_FILE).write_text(
                json.dumps({"kind": spec.kind, "labels": spec.labels, "pooling": spec.pooling}, indent=2)
            )
            if head:
                save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
    return folder


def read_peft_config(folder: str | Path) -> dict[str, Any]:
    """A PEFT folder's adapter_config.json; a folder without one or bad JSON is a ConfigError."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config_path} is not valid JSON ({error}); re-save the adapter") from error
    if not isinstance(cfg, dict):
        raise ConfigError(f"{config_path} must hold a JSON object (PEFT's adapter config)")
    return cfg


def _task_file(folder: Path) -> dict[str, Any]:
    path = folder / TASK_FILE
    if not path.is_file():
        return {}
    try:
        task = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); export the task again") from error
    return task if isinstance(task, dict) else {}


def peft_kind(bank: MultiTaskModel, folder: str | Path, kind: TaskKind | None = None) -> TaskKind:
    """The kind of task a PEFT folder holds: ``kind`` if given, else what the folder says (our task file,
    then PEFT's task_type), else what the base can do (an encoder only classifies)."""
    folder = Path(folder)
    if (
        kind is not None
    ):  # PEFT's task_type names the model class it wrapped, which a kind given may differ from
        return kind
    told = _task_file(folder).get("kind") or KINDS_BY_TASK_TYPE.get(
        str(read_peft_config(folder).get("task_type"))
    )
    return told or ("classification" if bank.base.arch == "encoder" else "generation")


def import_peft(
    bank: MultiTaskModel,
    folder: str | Path,
    task: str,
    kind: TaskKind | None = None,
    labels: list[str] | None = None,
) -> TaskSpec:
    """Add a PEFT adapter folder to the bank as task ``task``; returns its spec.

    ``kind``: see :func:`peft_kind`. A classification task takes its labels and head from the folder's
    multitune files when export wrote them; else ``labels`` must be given and the head starts untrained.
    """
    folder = Path(folder)
    cfg = read_peft_config(folder)
    kind = peft_kind(bank, folder, kind)
    sidecar = _task_file(folder)
    head: dict[str, torch.Tensor] = {}
    pooling = None
    if kind == "classification":
        if not labels and sidecar.get("labels"):
            labels, pooling = [str(x) for x in sidecar["labels"]], sidecar.get("pooling")
            if (folder / HEAD_FILE).is_file():
                head = load_file(str(folder / HEAD_FILE))
        if not labels:
            raise ConfigError(
                f"{folder} is a classification adapter whose labels and head are not in the folder "
                "(a PEFT adapter holds no head); pass --labels A,B,... (the head then starts "
                "untrained), or export it with 'multitune export-peft', which keeps them"
            )
    by_type = {f.peft_type: f for f in FORMATS.values()}
    peft_type = cfg.get("peft_type")
    if peft_type not in by_type:
        raise ConfigError(
            f"{folder} holds a PEFT {peft_type} adapter; import covers {', '.join(sorted(by_type))}"
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(
            f"{folder} has no adapter_model.safetensors (a .bin adapter would need pickle, which "
            "multitune never loads); re-save it with safe_serialization=True"
        )
    fmt = by_type[peft_type]
    config, ours = fmt.to_ours(bank, cfg, load_file(str(weights)))
    spec = bank.add_task(task, kind, fmt.method, config, labels, pooling)
    try:
        fresh = {k: v.detach() for k, v in bank.task_parameters(task).items() if k.startswith("head.")}
        bank.load_task_state_dict(task, {**ours, **fresh, **head})
    except ConfigError:
        bank.remove_task(task)
        raise
    return spec


# ---- LoRA ------------------------------------------------------------------------------------------
def _lora_export(bank: MultiTaskModel, task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg = LoRAConfig(**bank.tasks[task].config)
    own = bank.task_state_dict(task)
    adapted = {k.rsplit(".lora_", 1)[0] for k in own if ".lora_" in k}
    modules = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    linear = find_linear(bank.base.model, modules, bank.output_layer_names(), "--lora-target-modules")
    if set(linear) != adapted:  # the names alone would adapt more (BERT's 'dense' is also the pooler's)
        modules = sorted(adapted)
    config = {
        **common_config(bank, "LORA"),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.use_dora,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": bank.base.family.name == "gpt2",
    }
    return {PREFIX + k: v for k, v in own.items() if ".lora_" in k}, config


def _lora_to_ours(
    bank: MultiTaskModel, cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    targets = cfg.get("target_modules")
    if targets is None:  # PEFT always writes them; list(None) would be a raw TypeError
        raise ConfigError(
            "the PEFT LoRA adapter_config.json has no target_modules; re-save the adapter with PEFT, "
            "which writes them"
        )
    ours = {  # the files PEFT saves have no adapter name; a model's own state dict has ".default"
        key.removeprefix(PREFIX)
        .replace(".lora_A.default.", ".lora_A.")
        .replace(".lora_B.default.", ".lora_B.")
        .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"): v
        for key, v in state.items()
    }
    # Which layers PEFT adapted is read from the tensors (a regex or 'all-linear' target_modules imports too)
    adapted = sorted({k.rsplit(".lora_", 1)[0] for k in ours if ".lora_" in k})
    config = LoRAConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=adapted or ([targets] if isinstance(targets, str) else list(targets)),
        rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
    )
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
