"""What stands between a client and the scheduler: keys, size limits, text checks, OpenAI's error shape and
the Prometheus metrics of every request.

:class:`Guard` is pure ASGI middleware, so that it sees every request, routed or not: the key a path needs
(every path but ``/health`` the API key, ``/admin/*`` the admin key, compared as vLLM does: the header's
``Bearer`` and the key exactly as sent, as sha256 digests in constant time), the body limit (its
Content-Length before reading, else counted as it streams in), and a request's count, latency and in-flight
gauge, measured to the last byte sent. :func:`check_body` checks every text of a parsed body.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from pydantic import BaseModel

from multitune.scheduler import RequestError, check_text

log = logging.getLogger("multitune.server")

MAX_INPUT_CHARS = 100_000  # characters of one text (a prompt, a message, an input to classify)
MAX_REQUEST_BYTES = 8 * 2**20  # bytes of one request body
OPEN_PATHS = ("/health",)  # answered without any key (a load balancer's probe)
ADMIN_PATHS = ("/admin/load", "/admin/unload", "/admin/reload")
CLIENT_GONE = 499  # nginx's "client closed request": what the metrics record for an abandoned request
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# ---- errors ------------------------------------------------------------------------------------------------
def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    # a message may quote what the client sent: a lone surrogate in it could not be encoded as UTF-8
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": _error_type(status), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_name(loc: tuple[Any, ...]) -> str:
    """``("body", "stop", "list[str]", 1)`` -> ``"stop.1"``: the path a user wrote, without pydantic's tags
    of union members."""
    parts = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            continue
        parts.append(str(part))
    return ".".join(parts)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line for the first of pydantic's errors, naming the field (and the field, for OpenAI's ``param``)."""
    if not errors:
        return "the request body is not valid", None
    error = errors[0]
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"malformed JSON body ({detail}); send one JSON object", None
    field = _field_name(tuple(error.get("loc", ())))
    if not field:
        if kind == "missing":
            return "the request body is missing; send a JSON object", None
        return "the request body must be a JSON object (send it with Content-Type: application/json)", None
    if kind == "missing":
        hint = ": name the task to use (GET /v1/models lists them)" if field == "model" else ""
        return f"{field} is required{hint}", field
    return f"{field}: {error.get('msg', 'invalid value')}", field


def check_body(body: BaseModel, max_chars: int) -> None:
    """Every text of a parsed request body, before anything is queued: one a tokenizer cannot read is a 400,
    one over ``max_chars`` characters a 413, each naming the field as the client wrote it (``messages.1.content``)."""

    def walk(value: Any, field: str) -> None:
        if isinstance(value, str):
            check_text(value, field)
            if len(value) > max_chars:
                raise RequestError(413, f"{field} holds {len(value)} characters; this server takes at most "
                                        f"{max_chars} per text (its --max-input-chars)")
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{field}.{name}" if field else name)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{field}.{i}")

    walk(body, "")


# ---- metrics -----------------------------------------------------------------------------------------------
class Metrics:
    """The app's own Prometheus registry (not the global one: tests build many apps in one process)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.registry = CollectorRegistry()
        self.requests = Counter("multitune_requests_total", "HTTP requests answered", ["endpoint", "task", "status"],
                                registry=self.registry)
        self.latency = Histogram("multitune_request_seconds", "Time from request to the last byte of its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("multitune_batch_size", "Rows in each forward of the scheduler, by kind of forward",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.tokens = Counter("multitune_generated_tokens_total", "Tokens generated", ["task"], registry=self.registry)
        self.in_flight = Gauge("multitune_requests_in_flight", "API requests being answered", registry=self.registry)
        queue = Gauge("multitune_queue_depth", "Requests waiting in the scheduler's queue", registry=self.registry)
        queue.set_function(self._queue_depth)
        tasks = Gauge("multitune_tasks", "Tasks served", registry=self.registry)
        tasks.set_function(lambda: len(self._tasks()))
        with contextlib.suppress(Exception):  # /proc may be missing (not Linux): the rest still works
            ProcessCollector(registry=self.registry)

    def _tasks(self) -> dict[str, Any]:
        try:
            return self.scheduler.tasks()
        except Exception:  # noqa: BLE001  (a label must never fail a request)
            return {}

    def _queue_depth(self) -> float:
        return float(self.scheduler.stats.queue_depth)

    def task_label(self, task: str | None) -> str:
        """The task's name when it is served, else "unknown": labels must not grow with what clients send."""
        return task if task and task in self._tasks() else "unknown"

    def drain_batches(self) -> None:
        """Move the batch sizes the scheduler recorded since the last call (``Stats.drain``) into the histogram."""
        for kind, size in self.scheduler.stats.drain():
            self.batch_size.labels(kind=kind).observe(float(size))

    def render(self) -> bytes:
        self.drain_batches()
        return generate_latest(self.registry)


def digest(key: str | None) -> bytes | None:
    # compared as digests, so that hmac.compare_digest sees equal lengths and the key's length is not timed
    return None if key is None else hashlib.sha256(key.encode()).digest()


def key_matches(scope: dict, expected: bytes) -> bool:
    """Whether the request's ``Authorization`` header is exactly ``Bearer KEY`` (the scheme in any case, one
    space, the key as sent: " KEY" or "KEY " is another key), compared in constant time."""
    raw = dict(scope.get("headers") or []).get(b"authorization")
    if raw is None:
        return False
    scheme, _, token = raw.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token).digest(), expected)


class Guard:
    """Pure ASGI middleware: keys, the body limit, and per request its count, latency and in-flight gauge.

    It measures to the last byte sent, so a stream's latency is its whole duration. Any exception the
    routes let escape becomes a 500 for that request alone (logged with its traceback); the server goes on.
    """

    def __init__(self, app: Any, metrics: Metrics, api_key: str | None, admin_key: str | None,
                 max_request_bytes: int) -> None:
        self.app, self.metrics, self.max_request_bytes = app, metrics, max_request_bytes
        self.api, self.admin = digest(api_key), digest(admin_key or api_key)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info: dict[str, Any] = {"task": None, "status": None}
        scope["multitune"] = info
        started = time.perf_counter()
        sent = {"status": 500, "started": False}

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"], sent["started"] = message["status"], True
            await send(message)

        path: str = scope.get("path", "")
        api = path.startswith("/v1/")
        if api:
            self.metrics.in_flight.inc()
        try:
            denied = self._denied(scope, path)
            if denied is not None:
                await denied(scope, receive, tracked_send)
            else:
                replay = await self._read_body(scope, receive)
                if isinstance(replay, Response):
                    await replay(scope, receive, tracked_send)
                elif replay is not None:
                    await self.app(scope, replay, tracked_send)
                else:
                    sent["status"] = CLIENT_GONE
        except Exception as error:  # noqa: BLE001  (one request fails; the server keeps serving)
            log.exception("unexpected error answering %s %s", scope.get("method"), path)
            if not sent["started"]:
                message = f"internal error ({type(error).__name__}: {' '.join(str(error).split())[:300]}); " \
                          "the request was not completed, retry or report it"
                with contextlib.suppress(Exception):
                    await error_response(500, message)(scope, receive, tracked_send)
            sent["status"] = 500
        finally:
            if api:
                self.metrics.in_flight.dec()
            endpoint = getattr(scope.get("route"), "path", None) or (path if path in ADMIN_PATHS else "other")
            status = info["status"] or sent["status"]
            self.metrics.requests.labels(endpoint=endpoint, task=self.metrics.task_label(info["task"]),
                                         status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _denied(self, scope: dict, path: str) -> Response | None:
        """The 401 for a request without the key its path needs; None when it may go on."""
        if path in OPEN_PATHS:
            return None
        if path == "/admin" or path.startswith("/admin/"):
            if self.admin is None or key_matches(scope, self.admin):
                return None
            return error_response(401, "admin endpoints need the header 'Authorization: Bearer KEY' with the "
                                       "server's admin key (--admin-key, or the --api-key when it has none)")
        if self.api is None or key_matches(scope, self.api):
            return None
        return error_response(401, "this endpoint needs the header 'Authorization: Bearer KEY' with the server's "
                                   "API key (--api-key)")

    async def _read_body(self, scope: dict, receive: Callable) -> Callable | Response | None:
        """The request's body read up to the limit, as a ``receive`` that replays it (then passes on what comes
        next: a disconnect); a 413 once it is over (by its Content-Length, before reading, or as it streams in:
        a chunked body has none); None when the client left before sending all of it."""
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.strip().isdigit() and int(declared) > self.max_request_bytes:
            return self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        return replay

    def _too_large(self) -> Response:
        return error_response(413, f"the request body is over {self.max_request_bytes} bytes, this server's limit "
                                   "(its --max-request-bytes); send less in one request")
