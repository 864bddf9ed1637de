"""Where people look at the served tasks' health: ``GET /v1/monitor`` (JSON), ``GET /monitor`` (a web page over
it) and the per-task gauges on ``/metrics``.

``/v1/monitor`` is ``{"enabled": bool, "tasks": {NAME: {...}}}`` with one entry per served task: the drift
monitor's state of it (:meth:`multitune.health.live.Monitor.state`: ``requests``, ``monitored``, ``drift``,
``estimated_accuracy``, ``label_distribution``, ``history``; or ``monitored: false`` and a ``reason`` naming the
command that builds a profile), its ``kind``, ``method`` and ``version``, and under ``live`` its quality from
feedback (:meth:`multitune.health.store.FeedbackStore.live`; null when the server keeps no store). The gauges
of :class:`multitune.serve.observe.MonitorCollector` read the same entries, so the two never disagree.

The page is served without a key (it holds no data: its script fetches ``/v1/monitor``, which needs the API
key when the server has one; the page takes it from ``?key=`` or its key field).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from multitune.serve.monitor_page import PAGE

log = logging.getLogger("multitune.serve")

router = APIRouter()
OFF = "monitoring is off on this server (started with --no-monitor)"


def _served(request: Request) -> Any:
    return request.app.state.served


def monitor_tasks(served: Any, live: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """One entry per served task (see the module docstring); ``live``: each task's feedback summary when the
    caller read them already (off the event loop), else they are read here."""
    scheduler = served.scheduler
    monitor = getattr(scheduler, "monitor", None)
    cards = scheduler.tasks()
    watched = monitor.state().get("tasks", {}) if monitor is not None else {}
    if live is None:
        live = read_live(served, list(cards))
    tasks: dict[str, dict[str, Any]] = {}
    for name, card in sorted(cards.items()):
        entry = dict(watched.get(name) or {"requests": None, "monitored": False, "reason": OFF})
        entry.update(kind=card.get("kind"), method=card.get("method"), version=card.get("version"))
        entry["labels"] = list(card.get("labels") or [])
        entry["live"] = live.get(name)
        tasks[name] = entry
    return tasks


def read_live(served: Any, names: list[str]) -> dict[str, Any]:
    """Each task's live quality from the feedback store (None without a store; a store that fails to answer
    is logged and its tasks shown without, never a failed page)."""
    store = getattr(served, "store", None)
    if store is None:
        return {}
    live: dict[str, Any] = {}
    for name in names:
        try:
            live[name] = store.live(name)
        except Exception:  # noqa: BLE001  (the drift state is still worth showing)
            log.exception("reading task %r's feedback for the monitor failed", name)
            live[name] = None
    return live


@router.get("/v1/monitor", summary="Drift and live quality of every served task")
async def monitor(request: Request) -> Response:
    served = _served(request)
    names = list(served.scheduler.tasks())
    live = await asyncio.to_thread(read_live, served, names)  # the store may be a database over the network
    enabled = getattr(served.scheduler, "monitor", None) is not None
    return JSONResponse({"object": "monitor", "enabled": enabled, "tasks": monitor_tasks(served, live)})


@router.get("/monitor", summary="The monitor as a web page", response_class=HTMLResponse)
async def page(request: Request) -> Response:
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})


def gauge_tasks(served: Any) -> dict[str, dict[str, Any]]:
    """What the gauges read: :func:`monitor_tasks`, less ``monitored`` when the server runs with
    ``--no-monitor`` (a choice, not a task to alert on); the feedback gauges still go out."""
    tasks = monitor_tasks(served)
    if getattr(served.scheduler, "monitor", None) is None:
        for entry in tasks.values():
            entry.pop("monitored", None)
    return tasks


def install(app: FastAPI) -> None:
    """The monitor's routes and gauges on an app made by :func:`multitune.serve.app.create_app`."""
    served = app.state.served
    app.include_router(router)
    served.metrics.watch(lambda: gauge_tasks(served))
