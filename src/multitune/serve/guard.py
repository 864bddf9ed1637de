"""What stands between a client and the routes: keys, the body limit, and each request's metrics.

:class:`Guard` is pure ASGI middleware, so that it sees every request, routed or not: the key a path needs
(every path but ``/health`` and the ``/monitor`` page the API key, ``/admin/*`` the admin key, compared as
vLLM does: the header's ``Bearer`` and the key exactly as sent, as sha256 digests in constant time), the body
limit (its Content-Length before reading, else counted as it streams in), and a request's count, latency and
in-flight gauge, measured to the last byte sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import Response
from starlette.types import Message

from multitune.serve.observe import Metrics
from multitune.serve.openai import CLIENT_GONE, error_response

log = logging.getLogger("multitune.serve")

MAX_INPUT_CHARS = 100_000  # characters of one text (a prompt, a message, an input to classify)
MAX_REQUEST_BYTES = 8 * 2**20  # bytes of one request body
OPEN_PATHS = ("/health", "/monitor")  # without any key: a load balancer's probe; the monitor page, which
# holds no data (its script sends the key to /v1/monitor)
ADMIN_PATHS = ("/admin/load", "/admin/unload", "/admin/reload")


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

    def __init__(
        self, app: Any, metrics: Metrics, api_key: str | None, admin_key: str | None, max_request_bytes: int
    ) -> None:
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

        async def tracked_send(message: Message) -> None:
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
                message = (
                    f"internal error ({type(error).__name__}: {' '.join(str(error).split())[:300]}); "
                    "the request was not completed, retry or report it"
                )
                with contextlib.suppress(Exception):
                    await error_response(500, message)(scope, receive, tracked_send)
            sent["status"] = 500
        finally:
            if api:
                self.metrics.in_flight.dec()
            endpoint = getattr(scope.get("route"), "path", None) or (path if path in ADMIN_PATHS else "other")
            status = info["status"] or sent["status"]
            self.metrics.requests.labels(
                endpoint=endpoint, task=self.metrics.task_label(info["task"]), status=str(status)
            ).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _denied(self, scope: dict, path: str) -> Response | None:
        """The 401 for a request without the key its path needs; None when it may go on."""
        if path in OPEN_PATHS:
            return None
        if path == "/admin" or path.startswith("/admin/"):
            if self.admin is None or key_matches(scope, self.admin):
                return None
            return error_response(
                401,
                "admin endpoints need the header 'Authorization: Bearer KEY' with the "
                "server's admin key (--admin-key, or the --api-key when it has none)",
            )
        if self.api is None or key_matches(scope, self.api):
            return None
        return error_response(
            401,
            "this endpoint needs the header 'Authorization: Bearer KEY' with the server's "
            "API key (--api-key)",
        )

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
        return error_response(
            413,
            f"the request body is over {self.max_request_bytes} bytes, this server's limit "
            "(its --max-request-bytes); send less in one request",
        )
