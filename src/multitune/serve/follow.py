"""Serving follows versions: a served task switches to its folder's current version when the pointer moves.

A task served from a task root (a run folder, a bank's task folder; :mod:`multitune.health.versions`) serves
the version ``ROOT/versions/current`` named when it loaded. :class:`VersionWatch` reads every such pointer each
``interval`` seconds (``multitune serve --watch-versions``) and, for a task whose pointer now names another
version than the one served, asks the scheduler for the reload ``/admin/reload`` runs without a path: the worker
thread loads the task again from its root under a fresh internal name and repoints the public name between two
forwards, so rows in flight finish on the old version (:mod:`multitune.serve.names`). A promote or rollback
reaches the server within one interval and one load, with no request sent to it.

Why polling and not inotify: a pointer is one small file per task, replaced atomically (``os.replace``), so
a read every two seconds costs microseconds, sees replaces on every filesystem (NFS, bind mounts, which file
events miss) and needs no extra package. The reads run in a passing thread of the event loop's executor, which
never runs torch (the engine stays the worker's alone, see :func:`multitune.serve.engine.in_passing_thread`);
the reloads run on the worker as every admin operation does.

A task loaded from ``ROOT/versions/N`` itself is pinned to that version and never followed. A reload that fails
(a version folder removed, a damaged adapter) is logged and tried again only once the pointer moves again; the
task goes on serving the version it had.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from multitune.errors import MultituneError
from multitune.health.versions import current_version, task_root, version_of

log = logging.getLogger("multitune.serve")
DEFAULT_INTERVAL_S = 2.0  # multitune serve --watch-versions


def folder_version(adapter: str | Path) -> int:
    """The version an adapter folder is of its task root: N for ``ROOT/versions/N``, else 1 (the original)."""
    return version_of(adapter) or 1


def pinned(source: str | Path) -> bool:
    """Whether a task loaded from ``source`` keeps its version: ``ROOT/versions/N`` names one version."""
    return version_of(source) is not None


class VersionWatch:
    """Polls the version pointer of every followed task of a scheduler and reloads the tasks whose moved."""

    def __init__(self, scheduler: Any, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.scheduler, self.interval = scheduler, interval
        self.failed: dict[str, int] = {}  # task -> the version a reload to failed (tried again once it moves)
        self._warned: set[tuple[str, str]] = set()

    def due(self) -> dict[str, int]:
        """Public name -> the version its pointer names now, for every followed task serving another one
        (file reads only: safe off the worker thread)."""
        due: dict[str, int] = {}
        for name, (source, adapter) in self.scheduler.names.followed().items():
            if pinned(source):
                continue
            try:
                number = current_version(task_root(source))
            except MultituneError as error:  # a folder removed, a damaged pointer: said once, served as it is
                self._warn_once(name, f"task {name} keeps version {folder_version(adapter)}: {error}")
                continue
            if number == folder_version(adapter):
                self.failed.pop(name, None)
            elif self.failed.get(name) != number:
                due[name] = number
        return due

    async def poll(self) -> dict[str, int]:
        """One look at the pointers; each task whose pointer moved is reloaded (one after the other).
        Returns the versions the reloaded tasks serve now."""
        done: dict[str, int] = {}
        for name, number in (await asyncio.to_thread(self.due)).items():
            try:
                card = await self.scheduler.reload(name)
            except Exception as error:  # noqa: BLE001  (the task keeps its version; logged, never fatal)
                self.failed[name] = number
                message = " ".join(str(error).split())
                log.warning("task %s could not switch to version %d of its folder: %s", name, number, message)
                continue
            done[name] = card.get("task_version", number) if isinstance(card, dict) else number
            log.info("task %s now serves version %s of its folder", name, done[name])
        return done

    async def follow(self) -> None:
        """Poll every ``interval`` seconds until cancelled (the app's lifespan runs it)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001  (a fault of the watch itself: serving goes on, so does the watch)
                log.exception("the version watch failed; it looks again in %g s", self.interval)

    def _warn_once(self, name: str, message: str) -> None:
        if (name, message) not in self._warned:
            self._warned.add((name, message))
            log.warning("%s", " ".join(message.split()))
