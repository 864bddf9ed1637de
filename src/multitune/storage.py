"""Adapters on disk: one folder per task, safetensors for tensors, JSON for the rest. Never pickle.

::

    adapter/
      adapter.json          {"format": "multitune-adapter", "version": 1, "task": {...}, "base_model": ...}
      adapter.safetensors   the task's tensors by public key (see multitune.bank)

Every write goes to a temporary folder beside the target and is swapped in with renames, so a crash
leaves either the old adapter or the new one, never a mix.

A command that writes an output folder holds :func:`output_lock` on it for its whole run: a second
command into the same folder is refused with the holder's pid, and the first one's leftovers of a kill
(``.NAME.tmp-*``, ``.NAME.old-*``) are cleaned up by the next holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
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


class FolderInUse(ConfigError):
    """Another live process holds the output folder's lock."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: beside it (``.NAME.lock``), so the folder itself may be swapped atomically."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _holder_text(fd: int) -> str:
    """Who holds a lock, from its file: 'multitune train (process 12, host h, since ...)'."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096) or b"{}")
        pid, host = int(holder["pid"]), str(holder["host"])
        command = str(holder.get("command") or "a multitune command")
        since = str(holder.get("since") or "?")
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now, or not by us
        return "another process (it has just taken the lock)"
    alive = host != socket.gethostname() or _pid_alive(pid)
    gone = "" if alive else "; that process has ended, but a child of it still holds the lock"
    return f"{command[:200]} (process {pid} on {host[:100]}, since {since}{gone})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def is_locked(folder: str | Path) -> bool:
    """Whether a live process holds ``folder``'s lock now (a lock file of a dead process is not held)."""
    try:
        fd = os.open(lock_path(folder), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def output_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder ``folder`` while the block runs.

    The lock is ``flock`` on ``.NAME.lock`` beside the folder, holding the holder's pid, host and command:
    the kernel releases it when the process ends in any way (SIGKILL included), so a lock file left by a
    dead process is simply taken over. A second holder is refused at once with :class:`FolderInUse`,
    before it changes anything. On taking the lock, the stale temporaries of killed atomic writes in and
    beside the folder are removed (:func:`remove_stale_temporaries`). The folder is created if missing,
    and removed again on release if the block left it empty.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output {folder} is a file, not a folder; choose another --output")
    existed = folder.exists()
    path = lock_path(folder)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the parent was removed between the two calls: try again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by {holder}; wait for it to finish, or choose another "
                              "--output") from None
        try:  # the holder we waited for may have unlinked the file as it released it: lock the live one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        yield folder
    finally:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a command that failed before writing anything leaves no empty folder
        path.unlink(missing_ok=True)  # while still holding it; a waiter re-checks the inode
        os.close(fd)


def _stale(name: str) -> str | None:
    """'tmp' or 'old' for the names atomic_dir and write_json_atomic give their temporaries, else None."""
    if name.startswith("."):
        for kind in ("tmp", "old"):
            if f".{kind}-" in name:
                return kind
    return None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove what killed atomic writes left in ``folder`` (recursively) and beside it; returns what went.

    Call only while holding :func:`output_lock` on ``folder``: then no live process is writing there.
    Folders below that another process holds locked are left alone. A ``.NAME.old-*`` folder whose
    ``NAME`` is missing is the previous version of a swap cut between its two renames: it is put back.
    """
    folder = Path(folder)
    removed: list[Path] = []

    def clean(parent: Path, only: str | None = None) -> None:
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            return
        for entry in entries:
            kind = _stale(entry.name)
            if kind is None:
                continue
            target = entry.name[1:].split(f".{kind}-", 1)[0]
            if only is not None and target != only:
                continue
            if kind == "old" and (entry / "x").exists() and not (parent / target).exists():
                os.replace(entry / "x", parent / target)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)

    clean(folder.resolve().parent, only=folder.resolve().name)
    for root, dirs, _ in os.walk(folder):
        clean(Path(root))
        dirs[:] = [d for d in dirs if Path(root, d).exists() and not is_locked(Path(root, d))]
    return removed


def describe_folder(folder: str | Path) -> str:
    """What a non-empty folder holds, in words, so that an error's advice can fit what is there."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if "compare.json" in names:
        return "a comparison folder of 'multitune compare' (compare.json)"
    if CONFIG_FILE in names:
        return f"an adapter folder ({CONFIG_FILE})"
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        result = None
    if isinstance(result, dict) and isinstance(result.get("tasks"), dict):
        return "a bank of 'multitune train-multi' (result.json lists its tasks)"
    if isinstance(result, dict) and isinstance(result.get("command"), str) and result["command"].isidentifier():
        return f"a run folder of 'multitune {result['command']}'"
    if any((folder / n / CONFIG_FILE).is_file() or (folder / n / "adapter" / CONFIG_FILE).is_file() for n in names):
        return "a bank of adapter folders"
    shown = ", ".join(n[:60] for n in names[:4]) + (", ..." if len(names) > 4 else "")
    return f"a folder of other files ({shown or 'hidden files only'})"


_UMASK_FALLBACK: list[int] = []


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status).

    Elsewhere it is read once by setting a strict mask and putting the old one back: a file another
    thread creates in that instant is only more private, never more open.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if not _UMASK_FALLBACK:
        old = os.umask(0o077)
        os.umask(old)
        _UMASK_FALLBACK.append(old)
    return _UMASK_FALLBACK[0]


def publish_mode(path: str | Path) -> None:
    """Give ``path`` (and everything below a folder) the modes a plain ``open``/``mkdir`` would have.

    mkstemp and mkdtemp create 0600 files and 0700 folders, and safetensors writes 0600: published
    as they are, a server or a colleague of the same group could not read a bank.
    """
    mask = umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in paths:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target`` (old contents removed).

    What is swapped in gets the umask's modes (:func:`publish_mode`), whatever wrote it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        publish_mode(tmp)
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a temporary file beside ``path`` with the umask's mode, then rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2).encode())


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
