"""Adapters on disk: one folder per task, safetensors for tensors, JSON for the rest. Never pickle.

::

    adapter/
      adapter.json          {"format": "multitune-adapter", "version": 1, "task": {...}, "base_model": ...}
      adapter.safetensors   the task's tensors by public key (see multitune.bank)

Every write goes to a temporary folder beside the target and is swapped in with renames, so a crash
leaves either the old adapter or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.errors import ConfigError
from multitune.methods import get_method

FORMAT = "multitune-adapter"
VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target`` (old contents removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(bank: MultiTaskModel, task: str, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write one task's adapter folder atomically; returns the folder."""
    spec = bank.tasks[task]
    folder = Path(folder)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "task": spec.to_json(),
        "base_model": bank.base.source,
        "model_type": getattr(bank.base.model.config, "model_type", None),
        **(extra or {}),
    }
    with atomic_dir(folder) as tmp:
        save_file(bank.task_state_dict(task), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a multitune adapter folder (no {CONFIG_FILE}); give the folder "
                          "written by 'multitune train' (RUN/adapter)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); re-save the adapter") from error
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a multitune adapter (format {meta.get('format')!r})")
    return meta


def load_adapter(bank: MultiTaskModel, folder: str | Path, name: str | None = None) -> TaskSpec:
    """Add the task stored in ``folder`` to the bank (under ``name`` if given) and load its weights."""
    folder = Path(folder)
    meta = read_adapter_config(folder)
    task = meta["task"]
    method = get_method(task["method"])
    config = method.config_class(**task["config"])
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as error:
        raise ConfigError(f"cannot read {folder / WEIGHTS_FILE}: {' '.join(str(error).split())}") from error
    spec = bank.add_task(name or task["name"], task["kind"], task["method"], config, task["labels"], task["pooling"])
    try:
        bank.load_task_state_dict(spec.name, state)
    except ConfigError:
        bank.remove_task(spec.name)
        raise
    return spec
