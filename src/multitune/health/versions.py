"""Versions of a task: each update is a folder of its own, one pointer says which one is served.

A *task root* is a ``multitune train`` run folder (``RUN/adapter/``, ``RUN/config.yaml``) or a bank's task
folder (``BANK/TASK/``, itself an adapter folder). Its versions::

    ROOT/versions/current        the current version's number ("2\\n"), replaced atomically (os.replace)
    ROOT/versions/1/version.json what version 1 was trained on and how it scored (written by the first update)
    ROOT/versions/N/             version N >= 2: an adapter folder (adapter.json, adapter.safetensors, the
                                 drift profile) + version.json + data/ (its test split and replay sample)
    ROOT/data/                   version 1's kept data (train keeps it: test.jsonl, replay.jsonl)

Version 1's adapter stays where ``train`` wrote it (``RUN/adapter`` or ``TASK`` itself), untouched, so a
rollback to it loads the very bytes it served before, and a folder without ``versions/`` reads as version 1.
Every reader (``predict``, ``eval``, ``serve``, :meth:`multitune.serve.Engine.from_folder`) resolves a path
through :func:`current_adapter`; a path to ``ROOT/versions/N`` itself pins that version. Switching is one
atomic write of the pointer under the task root's output lock (:func:`multitune.storage.output_lock`), so
promote, rollback and update never write one folder at once, and a server reloading between forwards sees
either the old version or the new one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from multitune.errors import ConfigError
from multitune.storage import CONFIG_FILE, WEIGHTS_FILE, write_bytes_atomic, write_json_atomic

VERSIONS = "versions"
POINTER = "current"
VERSION_FILE = "version.json"
DATA = "data"  # kept data of a version: test.jsonl (its test split), replay.jsonl (a sample of its training rows)


def _is_adapter(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def _is_run(folder: Path) -> bool:
    return _is_adapter(folder / "adapter") and not _is_adapter(folder)


def version_of(path: str | Path) -> int | None:
    """N when ``path`` is a version's folder (``ROOT/versions/N``), else None."""
    path = Path(path)
    return int(path.name) if path.parent.name == VERSIONS and path.name.isdigit() else None


def task_root(path: str | Path) -> Path:
    """The task root of ``path``: a run folder, its ``adapter/``, a bank's task folder or ``ROOT/versions/N``."""
    path = Path(path)
    if version_of(path) is not None:
        return path.parent.parent
    if path.name == "adapter" and _is_run(path.parent):
        return path.parent
    if _is_run(path) or _is_adapter(path) or (path / VERSIONS).is_dir():
        return path
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist; give a run folder of 'multitune train' or a bank's task folder"
        )
    raise ConfigError(
        f"{path} is not a task folder (no {CONFIG_FILE} nor adapter/{CONFIG_FILE}); give a run folder of "
        "'multitune train' or a bank's task folder (BANK/TASK)"
    )


def pointer_file(root: str | Path) -> Path:
    """``ROOT/versions/current``: what a server watches to pick up a promote or a rollback."""
    return Path(root) / VERSIONS / POINTER


def current_version(root: str | Path) -> int:
    """The current version's number: the pointer's, 1 without one."""
    pointer = pointer_file(root)
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        return 1
    except OSError as error:
        raise ConfigError(f"cannot read {pointer} ({type(error).__name__}); check its permissions") from error
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"{pointer} should hold a version number, not {text[:20]!r}; set it with "
            f"'multitune promote {root} N' (multitune versions {root} lists them)"
        )
    return int(text)


def original_adapter(root: str | Path) -> Path:
    """Version 1's adapter folder, where ``train`` (``RUN/adapter``) or the bank (``TASK``) wrote it."""
    root = Path(root)
    return root if _is_adapter(root) else root / "adapter"


def version_folder(root: str | Path, number: int) -> Path:
    return Path(root) / VERSIONS / str(number)


def version_numbers(root: str | Path) -> list[int]:
    """Every version there is: 1 (the original adapter) and each ``versions/N`` holding an adapter."""
    folder = Path(root) / VERSIONS
    found = {1}
    if folder.is_dir():
        found |= {int(p.name) for p in folder.iterdir() if p.name.isdigit() and _is_adapter(p)}
    return sorted(found)


def version_adapter(root: str | Path, number: int) -> Path:
    """The adapter folder of version ``number``; one line listing the versions when there is none."""
    if number == 1:
        return original_adapter(root)
    folder = version_folder(root, number)
    if number > 1 and _is_adapter(folder):
        return folder
    listed = ", ".join(map(str, version_numbers(root)))
    raise ConfigError(
        f"{root} has no version {number}; its versions are {listed} (multitune versions {root})"
    )


def current_adapter(path: str | Path) -> Path | None:
    """The adapter folder to load for ``path`` now, or None when ``path`` is no task folder.

    A run folder, its ``adapter/`` and a bank's task folder resolve through their pointer; ``ROOT/versions/N``
    is that version (pinned)."""
    path = Path(path)
    if version_of(path) is not None and _is_adapter(path):
        return path
    if path.name == "adapter" and _is_run(path.parent):
        root = path.parent
    elif _is_run(path) or _is_adapter(path):
        root = path
    else:
        return None
    return version_adapter(root, current_version(root))


def set_current(root: str | Path, number: int) -> None:
    """Point the task at version ``number`` (one atomic write; the caller holds the root's output lock)."""
    version_adapter(root, number)  # it exists
    (Path(root) / VERSIONS).mkdir(exist_ok=True)
    write_bytes_atomic(pointer_file(root), f"{number}\n".encode())
    record = read_version(root, number)
    if record:
        record.setdefault("promoted", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
        write_version(root, number, record)


def read_version(root: str | Path, number: int) -> dict[str, Any]:
    """``version.json`` of version ``number`` ({} when none was written: version 1 before any update)."""
    file = version_folder(root, number) / VERSION_FILE
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{file} is damaged ({type(error).__name__}); remove it or restore it") from error
    if not isinstance(record, dict):
        raise ConfigError(f"{file} should hold a JSON object; remove it or restore it")
    return record


def write_version(root: str | Path, number: int, record: dict[str, Any]) -> None:
    folder = version_folder(root, number)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / VERSION_FILE, record)


def data_folder(root: str | Path, number: int) -> Path:
    """Where version ``number`` keeps its test split and replay sample."""
    return Path(root) / DATA if number == 1 else version_folder(root, number) / DATA


def folder_bytes(folder: Path) -> int:
    """Bytes of an adapter folder's weights (what a version costs on disk)."""
    weights = folder / WEIGHTS_FILE
    return weights.stat().st_size if weights.is_file() else 0
