"""Served task names: the public name a request gives, the engine's internal name of the version it runs on.

A reload is atomic because names are indirections: the new version is loaded under a fresh internal name
(``TASK--vN``) while requests keep running on the old one, then the public name is repointed between two
forwards; the old version is retired and removed from the engine once no admitted row uses it. Unloading
retires the same way. Every mutation happens on the scheduler's worker thread (admin operations run between
forwards); the map is read by request threads, so each change of it holds the scheduler's lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from multitune.errors import MultituneError
from multitune.serve.decode import RequestError
from multitune.serve.follow import folder_version

log = logging.getLogger("multitune.serve")


class TaskNames:
    """Public name -> internal name and version of every served task, and the retired versions."""

    def __init__(self, engine: Any, lock: threading.Lock) -> None:
        self.engine = engine
        self._lock = lock
        self.internal: dict[str, str] = {name: name for name in engine.tasks}
        self.versions: dict[str, int] = dict.fromkeys(engine.tasks, 1)
        self.retired: set[str] = set()  # internal names of replaced or unloaded versions, removed once unused
        self._counter = itertools.count(2)

    # ---- reading (the caller holds the lock) ---------------------------------------------------------
    def cards(self) -> dict[str, dict[str, Any]]:
        """Every served task: its kind, method, labels, version (loads of it in this server: 1, then one more
        each reload) and ``task_version``, the version of its folder it serves (1 for a folder without
        versions; None for a task not loaded from a folder)."""
        specs = self.engine.tasks
        adapters = getattr(self.engine, "adapters", {})
        return {
            name: {
                "kind": specs[internal].kind,
                "method": specs[internal].method,
                "labels": list(specs[internal].labels or []),
                "version": self.versions[name],
                "task_version": folder_version(adapters[internal]) if internal in adapters else None,
            }
            for name, internal in self.internal.items()
        }

    def followed(self) -> dict[str, tuple[str, Path]]:
        """Public name -> (what it was loaded from, the adapter folder it serves) of every task loaded from a
        folder: what the version watch (:mod:`multitune.serve.follow`) compares with the folders' pointers.
        Safe from any thread (takes the lock; the engine's maps are only read, one key at a time)."""
        with self._lock:
            internal = dict(self.internal)
        sources, adapters = self.engine.sources, getattr(self.engine, "adapters", {})
        found = {name: (sources.get(i), adapters.get(i)) for name, i in internal.items()}
        return {name: (source, adapter) for name, (source, adapter) in found.items() if source and adapter}

    def resolve(self, task: Any, kind: str | None) -> str:
        """The internal name ``task`` runs on now; 404 for a task not served, 400 for one of the other kind
        (``kind`` None: any kind)."""
        internal = self.internal.get(task) if isinstance(task, str) else None
        if internal is None:
            served = ", ".join(sorted(self.internal)) or "none"
            raise RequestError(404, f"unknown task '{task}'; served tasks: {served}")
        actual = self.engine.tasks[internal].kind
        if kind is not None and actual != kind:
            verb = "/v1/classify" if actual == "classification" else "/v1/completions"
            raise RequestError(400, f"task '{task}' is a {actual} task; use {verb}")
        return internal

    # ---- admin operations (on the worker thread) -----------------------------------------------------
    def load(self, name: str, folder: str) -> None:
        if name in self.internal:
            raise RequestError(409, f"task '{name}' is already served; use reload to replace it")
        self._load_as(name, name, folder)
        self.versions[name] = 1

    def unload(self, name: str) -> None:
        if name not in self.internal:
            raise RequestError(
                404, f"unknown task '{name}'; served tasks: {', '.join(sorted(self.internal))}"
            )
        with self._lock:
            self.retired.add(self.internal.pop(name))
            self.versions.pop(name, None)

    def reload(self, name: str, folder: str | None) -> None:
        """Load ``name`` again from ``folder``, else from what it was loaded from (a task root: its current
        version), under a fresh internal name, and repoint the public name to it."""
        if name not in self.internal:
            raise RequestError(404, f"unknown task '{name}'; load it first")
        source = folder or self.engine.sources.get(self.internal[name])
        if source is None:
            raise RequestError(400, f"task '{name}' was not loaded from a folder; give path")
        old = self.internal[name]
        self._load_as(name, f"{name[:56]}--v{next(self._counter)}", source)  # a valid task name of its own
        self.versions[name] = self.versions.get(name, 1) + 1
        self.retired.add(old)

    def collect(self, in_use: Iterable[str]) -> None:
        """Remove from the engine every retired version that no admitted row uses any more."""
        for internal in sorted(self.retired - set(in_use)):
            self.engine.remove(internal)
            self.retired.discard(internal)

    def _load_as(self, name: str, internal: str, folder: str) -> None:
        try:
            self.engine.load(folder, internal)
        except MultituneError as error:
            raise RequestError(400, str(error)) from error
        except Exception as error:  # noqa: BLE001  (its text may quote the file: only the log gets it)
            log.exception("loading %s failed", folder)
            raise RequestError(
                500, f"loading {folder} failed ({type(error).__name__}); the server's log has the details"
            ) from error
        with self._lock:
            self.internal[name] = internal
