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
import re
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
from multitune.errors import ConfigError, ModelError
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
            raise FolderInUse(
                f"{folder} is in use by {holder}; wait for it to finish, or choose another --output"
            ) from None
        try:  # the holder we waited for may have unlinked the file as it released it: lock the live one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        yield folder
    finally:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a command that failed before writing anything leaves no empty folder
        path.unlink(missing_ok=True)  # while still holding it; a waiter re-checks the inode
        os.close(fd)


_TEMPORARY = re.compile(r"^\.(.+)\.(tmp|old)-[A-Za-z0-9_]+$")  # mkstemp/mkdtemp's suffix, or a pid


def _stale(name: str) -> tuple[str, str] | None:
    """('tmp' or 'old', the name it stands for) for the names atomic_dir and write_json_atomic give their
    temporaries, else None."""
    match = _TEMPORARY.match(name)
    return (match[2], match[1]) if match else None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove what killed atomic writes left in ``folder`` (recursively) and beside it; returns what went.

    Call only while holding :func:`output_lock` on ``folder``: then no live process is writing there.
    Only the folder and its subfolders are cleaned (where multitune's own writes go), not deeper.
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
            stale = _stale(entry.name)
            if stale is None:
                continue
            kind, target = stale
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
    # Two levels down is where multitune writes (RUN/.adapter.tmp-*, OUT/bank/.TASK.tmp-*, OUT/results/...):
    # an --output that is a big folder of other things is neither walked nor cleaned further down.
    for root, dirs, _ in os.walk(folder):
        clean(Path(root))
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = (
            [] if depth >= 1 else [d for d in dirs if Path(root, d).exists() and not is_locked(Path(root, d))]
        )
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
    if (
        isinstance(result, dict)
        and isinstance(result.get("command"), str)
        and result["command"].isidentifier()
    ):
        return f"a run folder of 'multitune {result['command']}'"
    if any(
        (folder / n / CONFIG_FILE).is_file() or (folder / n / "adapter" / CONFIG_FILE).is_file()
        for n in names
    ):
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


def save_adapter(
    bank: MultiTaskModel, task: str, folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write one task's adapter folder atomically; returns the folder.

    ``base`` records the base's fingerprint (:attr:`multitune.models.Base.fingerprint`), which every
    load checks.
    """
    spec = bank.tasks[task]
    folder = Path(folder)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "task": spec.to_json(),
        "base_model": bank.base.source,
        "model_type": getattr(bank.base.model.config, "model_type", None),
        "base": bank.base.fingerprint,
        **({"base_quantize": bank.base.quantize} if bank.base.quantize else {}),  # loads quantize it again
        **(extra or {}),
    }
    if spec.stack_on is not None:  # where the component it runs on is (multitune.compose.stack)
        from multitune.compose.stack import reference

        meta["stack_on"] = reference(bank, task, folder)
    with atomic_dir(folder) as tmp:
        save_file(bank.task_state_dict(task), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


# ---- reading an adapter document: every field checked, nothing of the file echoed --------------------------
KINDS = ("classification", "generation", "domain")
OBJECTIVES = ("clm", "mlm", "simcse")  # a domain task's (multitune.domain)
POOLINGS = ("mean", "cls", "last")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (int, float, bool, str, list[...], Literal, X | None)."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # an annotation outside this list: the method's validate() judges it


def _names(keys: Any) -> str:
    """Field names from a file, shown safely: the first three, each cut short and quoted."""
    shown = [repr(str(k)[:40]) for k in sorted(map(str, keys))[:3]]
    return ", ".join(shown) + (", ..." if len(keys) > 3 else "")


def adapter_problems(meta: Any) -> list[str]:
    """What is wrong with an adapter document, one phrase per field (empty: it loads)."""
    import dataclasses
    import typing

    from multitune.methods import METHODS

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return [f"it is not a multitune adapter (no format '{FORMAT}')"]
    problems = []
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        problems.append("field 'version' is missing or not a number")
    elif version > VERSION:
        problems.append(
            f"it was written by a newer multitune (version {version}, this one reads {VERSION}); upgrade"
        )
    if not isinstance(meta.get("base_model"), str):
        problems.append("field 'base_model' is missing or not a string")
    if "base" in meta and not isinstance(meta["base"], dict):
        problems.append("field 'base' is not a mapping")
    from multitune.compose.stack import reference_problems

    problems += reference_problems(meta)
    task = meta.get("task")
    if not isinstance(task, dict):
        return [*problems, "field 'task' is missing or not a mapping"]
    for key, ok in (
        ("name", isinstance(task.get("name"), str) and task.get("name")),
        ("kind", task.get("kind") in KINDS),
        ("method", task.get("method") in METHODS),
        (
            "labels",
            isinstance(task.get("labels", []), list)
            and all(isinstance(x, str) for x in task.get("labels", [])),
        ),
        ("pooling", task.get("pooling") is None or task.get("pooling") in POOLINGS),
        (
            "objective",
            task.get("objective") in OBJECTIVES
            if task.get("kind") == "domain"
            else task.get("objective") is None,
        ),
    ):
        if not ok:
            wanted = {
                "kind": f"one of {', '.join(KINDS)}",
                "method": f"one of {', '.join(sorted(METHODS))}",
                "labels": "a list of strings",
                "pooling": f"one of {', '.join(POOLINGS)} or null",
                "objective": f"one of {', '.join(OBJECTIVES)} for a domain task, else null",
            }
            what = "missing" if key not in task else f"not {wanted.get(key, 'a non-empty string')}"
            problems.append(f"field 'task.{key}' is {what}")
    if (
        task.get("kind") == "classification"
        and isinstance(task.get("labels"), list)
        and len(task["labels"]) < 2
    ):
        problems.append("field 'task.labels' needs at least 2 labels for a classification task")
    config = task.get("config")
    if not isinstance(config, dict):
        problems.append(f"field 'task.config' is {'missing' if 'config' not in task else 'not a mapping'}")
    elif task.get("method") in METHODS:
        cls = METHODS[task["method"]].config_class
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            problems.append(
                f"field 'task.config' has setting(s) {_names(unknown)} that {task['method']} does not know"
            )
        wrong = [k for k in sorted(set(config) & fields) if not _fits(config[k], hints[k])]
        if wrong:
            problems.append(
                f"field(s) {', '.join(f'task.config.{k}' for k in wrong[:3])} have a value of the wrong type"
            )
        if not unknown and not wrong:
            problems += [f"task.config: {p}" for p in cls(**config).validate()]
    return problems


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The adapter document of ``folder``, checked field by field: a damaged one is one ConfigError line."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder} is not a multitune adapter folder (no {CONFIG_FILE}); give the folder "
            "written by 'multitune train' (RUN/adapter)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}); re-save the adapter"
        ) from error
    except (UnicodeDecodeError, OSError) as error:
        raise ConfigError(
            f"cannot read {path} as UTF-8 text ({type(error).__name__}); re-save the adapter"
        ) from error
    problems = adapter_problems(meta)
    if problems:
        advice = "" if problems[0].startswith("it is not") else "; train or save the adapter again"
        raise ConfigError(f"{path}: " + "; ".join(problems) + advice)
    return meta


def _described(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {str(v)[:60]}" for k, v in facts.items())


def check_base(meta: dict[str, Any], base: Any, folder: Path) -> None:
    """Refuse an adapter saved on another base: its recorded fingerprint must match the loaded base's.

    Adapters from before fingerprints were recorded are compared on what they have (``model_type``).
    """
    recorded = meta.get("base") or ({"model_type": meta["model_type"]} if meta.get("model_type") else {})
    actual = base.fingerprint
    differ = [k for k in recorded if k in actual and recorded[k] != actual[k]]
    if differ:
        shown = {k: recorded[k] for k in differ}
        raise ModelError(
            f"the adapter {folder} was trained on '{str(meta['base_model'])[:200]}' ({_described(shown)}), "
            f"but the base loaded is '{base.source}' ({_described({k: actual[k] for k in differ})}); load "
            "it on the base it was trained on, or train it again on this one"
        )


def load_adapter(bank: MultiTaskModel, folder: str | Path, name: str | None = None) -> TaskSpec:
    """Add the task stored in ``folder`` to the bank (under ``name`` if given) and load its weights.

    The document is checked first (:func:`read_adapter_config`), then its base against the bank's
    (:func:`check_base`): nothing is added to the bank when either fails.
    """
    folder = Path(folder)
    meta = read_adapter_config(folder)
    check_base(meta, bank.base, folder)
    task = meta["task"]
    method = get_method(task["method"])
    config = method.config_class(**task["config"])
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as error:
        raise ConfigError(f"cannot read {folder / WEIGHTS_FILE}: {' '.join(str(error).split())}") from error
    if method.saved is not None:
        config = method.saved(config, state)
    on, before = None, set(bank.tasks)
    if "stack_on" in meta:  # its component first (multitune.compose.stack)
        from multitune.compose.stack import load_component

        on = load_component(bank, meta["stack_on"], folder, name or task["name"])
    try:
        spec = _add_loaded(bank, folder, task, name, config, state, on)
    except ConfigError:
        for added in [t for t in bank.slots if t not in before][::-1]:  # a component it brought in
            bank.remove_task(added)
        raise
    return spec


def _add_loaded(
    bank: MultiTaskModel,
    folder: Path,
    task: dict[str, Any],
    name: str | None,
    config: Any,
    state: dict[str, Any],
    on: str | None,
) -> TaskSpec:
    spec = bank.add_task(
        name or task["name"],
        task["kind"],
        task["method"],
        config,
        task.get("labels", []),
        task.get("pooling"),
        task.get("objective"),
        on,
    )
    try:
        bank.load_task_state_dict(spec.name, state)
    except ConfigError:
        bank.remove_task(spec.name)
        raise
    if not get_method(spec.method).changes_base:  # (a full fine-tune is never a component: not hashed)
        from multitune.compose.stack import digest

        bank.loaded_from[spec.name] = (folder, digest(folder))
    return spec
