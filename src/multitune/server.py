"""``multitune serve PATH...``: many tasks behind one OpenAI-compatible HTTP API, from one frozen base.

The HTTP layer only translates: it parses and checks requests, hands them to the
:class:`multitune.scheduler.Scheduler` (which owns the model and batches rows of every task into shared
forwards), and turns the answers, streams and errors into OpenAI's shapes. The ``model`` field of a request
names the task.

Endpoints: ``POST /v1/completions`` and ``/v1/chat/completions`` (``stream: true`` gives server-sent events),
``POST /v1/classify``, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and the admin
endpoints ``POST /admin/load``, ``/admin/unload``, ``/admin/reload``.

Keys, as vLLM does: with an API key every endpoint but ``/health`` (``/v1/*``, ``/metrics``, ``/docs``,
``/openapi.json``...) needs ``Authorization: Bearer KEY``; ``/admin/*`` needs the admin key, which is the API
key unless one of its own is given (:mod:`multitune.http_guard` checks them, the body limit and the texts).
The admin endpoints load only from the served folders and those named with ``--allow-load-from``.

Limits: a body over ``max_request_bytes`` (by its Content-Length, or counted as it streams in) and a text over
``max_input_chars`` are a 413 naming the limit; classification inputs longer than the task's ``max_length``
tokens are cut as in training, and the answer's ``truncated`` says so.

No input crashes the server: every mistake is a 4xx in OpenAI's error shape with one line naming the field
and the fix; an unexpected failure is a 500 for that request alone. A full queue answers 429 (back-pressure),
a request past the scheduler's deadline 504, and a client that goes away cancels its generation, so that
its row leaves the batch at the next decode step instead of running to ``max_tokens`` for nobody.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitune.errors import ConfigError, MultituneError
from multitune.http_guard import (
    CLIENT_GONE,
    MAX_INPUT_CHARS,
    MAX_REQUEST_BYTES,
    Guard,
    Metrics,
    check_body,
    error_body,
    error_response,
    validation_message,
)
from multitune.scheduler import RequestError, SamplingParams

log = logging.getLogger("multitune.server")
T = TypeVar("T")

API_KEY_ENV = "MULTITUNE_API_KEY"
ADMIN_KEY_ENV = "MULTITUNE_ADMIN_KEY"
MAX_INPUTS = 1024  # texts in one /v1/classify request
MAX_PATH_CHARS = 4096  # an admin body's path (Linux's PATH_MAX), whatever --max-input-chars says
GRACE_S = 10.0  # the server's own deadline is the scheduler's plus this (a safety net: the scheduler times out first)
DISCONNECT_POLL_S = 0.2


# ---- request bodies ----------------------------------------------------------------------------------------
class _Body(BaseModel):
    # OpenAI clients send fields this server has no use for (user, presence_penalty...): ignore them.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = False
    best_of: int | None = None


class ContentPart(_Body):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]


_TASK_FIELD = "the task's public name, as in the 'model' field of the other endpoints ('name' is accepted too)"


class LoadRequest(_Body):
    """``POST /admin/load``: serve one more task, read from a folder the server may load from."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"), description=_TASK_FIELD)
    path: str = Field(min_length=1, description="a run folder (RUN, as 'multitune train --output RUN' writes it) or "
                                                "an adapter folder (RUN/adapter, BANK/TASK), inside the served "
                                                "folders or a folder named with --allow-load-from")


class UnloadRequest(_Body):
    """``POST /admin/unload``: stop serving a task (requests already running on it finish first)."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"), description=_TASK_FIELD)


class ReloadRequest(_Body):
    """``POST /admin/reload``: replace a served task by a new version, atomically (running requests finish on
    the old one)."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"), description=_TASK_FIELD)
    path: str | None = Field(None, description="where to read the new version (as for /admin/load); default: the "
                                               "folder the task was loaded from")


# ---- errors ------------------------------------------------------------------------------------------------
class _ClientGone(Exception):
    """The client disconnected before its answer: nobody reads the response."""


# ---- helpers -----------------------------------------------------------------------------------------------
def _note(request: Request, task: str) -> None:
    info = request.scope.get("multitune")
    if info is not None:
        info["task"] = task


def _sampling(body: _Sampling, max_tokens: int | None) -> SamplingParams:
    """OpenAI's sampling fields as checked SamplingParams (defaults where the client sent nothing or null)."""
    if body.n not in (None, 1):
        raise RequestError(400, f"n must be 1 (got {body.n}): this server returns one choice per request; "
                                "send several requests instead")
    if body.logprobs not in (None, False):
        raise RequestError(400, "logprobs is not supported by this server; leave it out")
    defaults = SamplingParams()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                            temperature=defaults.temperature if body.temperature is None else body.temperature,
                            top_p=defaults.top_p if body.top_p is None else body.top_p, stop=stop, seed=body.seed)
    params.validate()
    return params


def _prompt(body: CompletionRequest) -> str:
    if body.echo:
        raise RequestError(400, "echo is not supported by this server; leave it out")
    if body.best_of not in (None, 1):
        raise RequestError(400, f"best_of must be 1 (got {body.best_of}); leave it out")
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise RequestError(400, f"prompt must be one string (got a list of {len(body.prompt)}); "
                                "send one request per prompt")
    return body.prompt[0]


def _messages(body: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for message in body.messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content if part.type == "text")
        out.append({"role": message.role, "content": content or ""})
    return out


def _finish_reason(handle: Any) -> str:
    return getattr(handle, "finish_reason", None) or "stop"


def _usage(handle: Any) -> dict[str, int]:
    prompt, completion = int(handle.prompt_tokens), int(handle.completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _unless_gone(request: Request, work: Awaitable[T], deadline: float, abandon: Callable[[], None]) -> T:
    """``work``'s result, unless the client disconnects first (then ``abandon()``: the scheduler drops the
    request) or ``deadline`` seconds pass (504). Best effort: the disconnect is polled every 0.2 s."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the server shuts down under us
        abandon()
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    abandon()
    task.cancel()
    if watch in done:
        raise _ClientGone()
    raise RequestError(504, f"no answer within {deadline:g} s; retry, ask for fewer tokens or raise --timeout")


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that always run ``on_close`` when the response ends, however it ends (done,
    client gone, server stopping): that is where an unfinished generation is cancelled."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001,S110  (closing is best effort; on_close below is what matters)
                pass
            finally:
                self._on_close()


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(scheduler: Any, api_key: str | None = None, model_name: str = "", *, admin_key: str | None = None,
               load_from: Sequence[str | Path] = (), max_input_chars: int = MAX_INPUT_CHARS,
               max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP API over a :class:`~multitune.scheduler.Scheduler` (started and stopped with the app).

    ``api_key``: every endpoint but ``/health`` needs ``Authorization: Bearer api_key``. ``admin_key``: what
    ``/admin/*`` needs (default: ``api_key``; neither: admin is open). ``load_from``: the folders whose
    contents ``/admin/load`` and ``/admin/reload`` may read (symlinks followed; none: no path is accepted).
    ``model_name``: the base model, reported by ``/health`` and ``/v1/models``.
    """
    metrics = Metrics(scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()

        async def drain() -> None:  # keep the histogram fed even when nobody scrapes /metrics for a while
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    metrics.drain_batches()

        drainer = asyncio.create_task(drain())
        try:
            yield
        finally:
            drainer.cancel()
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="multitune", summary="Many tasks from one frozen base, OpenAI-compatible",
                  lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(Guard, metrics=metrics, api_key=api_key, admin_key=admin_key,
                       max_request_bytes=max_request_bytes)
    roots = [Path(root).resolve() for root in load_from]

    def deadline() -> float:
        return float(getattr(scheduler, "timeout_s", 60.0) or 60.0) + GRACE_S

    # ---- errors --------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(error.errors()))
        return error_response(400, message, param)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        status = error.status if isinstance(getattr(error, "status", None), int) else 400
        return error_response(status, " ".join(str(error).split()))

    @app.exception_handler(MultituneError)
    async def mistaken(request: Request, error: MultituneError) -> JSONResponse:
        return error_response(400, " ".join(str(error).split()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see /v1/models, /v1/completions, " \
                      "/v1/chat/completions, /v1/classify, /health, /metrics"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return error_response(error.status_code, message)

    @app.exception_handler(_ClientGone)
    async def gone(request: Request, error: _ClientGone) -> Response:
        info = request.scope.get("multitune")
        if info is not None:
            info["status"] = CLIENT_GONE
        return Response(status_code=CLIENT_GONE)

    # ---- generation ----------------------------------------------------------------------------------
    def stream(request: Request, handle: Any, task: str, chunk: Callable[[str | None, str | None], dict],
               usage: bool) -> _EventStream:
        state = {"finished": False, "counted": False}
        info = request.scope.get("multitune")

        def close() -> None:
            if not state["finished"]:
                state["finished"] = True
                with contextlib.suppress(Exception):
                    handle.cancel()
                if info is not None:
                    info["status"] = CLIENT_GONE
            if not state["counted"]:
                state["counted"] = True
                metrics.tokens.labels(task=metrics.task_label(task)).inc(int(handle.completion_tokens or 0))

        async def events() -> AsyncIterator[str]:
            try:
                first = chunk(None, None)
                if first:
                    yield _event(first)
                # The deadline spans only the waits for pieces, never a yield (a slow reader is not the
                # scheduler's fault, and a timeout must not fire while Starlette is sending).
                loop = asyncio.get_running_loop()
                end = loop.time() + deadline()
                pieces = handle.stream().__aiter__()
                while True:
                    try:
                        piece = await asyncio.wait_for(pieces.__anext__(), max(0.0, end - loop.time()))
                    except StopAsyncIteration:
                        break
                    if piece:
                        yield _event(chunk(piece, None))
                state["finished"] = True
                yield _event(chunk("", _finish_reason(handle)))
                if usage:
                    yield _event({**chunk("", None), "choices": [], "usage": _usage(handle)})
                yield "data: [DONE]\n\n"
            except RequestError as error:  # the scheduler ended it (timeout, shutdown): say so in the stream
                state["finished"] = True
                yield _event(error_body(error.status, " ".join(str(error).split())))
                yield "data: [DONE]\n\n"
            except TimeoutError:  # the server's own deadline: the scheduler did not answer
                yield _event(error_body(504, f"no answer within {deadline():g} s; retry or raise --timeout"))
                yield "data: [DONE]\n\n"
            except Exception as error:  # noqa: BLE001  (headers are sent: report in the stream, not as a 500)
                log.exception("stream of task %r failed", task)
                yield _event(error_body(500, f"internal error ({type(error).__name__}: {error})"))
                yield "data: [DONE]\n\n"
            finally:
                close()

        return _EventStream(events(), close)

    async def answer(request: Request, handle: Any, task: str) -> tuple[str, str]:
        try:
            text, reason = await _unless_gone(request, handle.result(), deadline(), handle.cancel)
        finally:
            metrics.tokens.labels(task=metrics.task_label(task)).inc(int(handle.completion_tokens or 0))
        return text, reason

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _note(request, body.model)
        check_body(body, max_input_chars)
        prompt = _prompt(body)
        params = _sampling(body, body.max_tokens)
        handle = scheduler.submit_generate(body.model, prompt, params)  # on the loop: stream() needs it
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if body.stream:
            def chunk(piece: str | None, reason: str | None) -> dict:
                if piece is None:
                    return {}
                return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(request, handle, body.model, chunk, include)
        text, reason = await answer(request, handle, body.model)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                             "usage": _usage(handle)})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        _note(request, body.model)
        check_body(body, max_input_chars)
        if not body.messages:
            raise RequestError(400, "messages must hold at least one {role, content} message")
        params = _sampling(body, body.max_completion_tokens if body.max_tokens is None else body.max_tokens)
        prompt = scheduler.chat_prompt(body.model, _messages(body))
        handle = scheduler.submit_generate(body.model, prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if body.stream:
            def chunk(piece: str | None, reason: str | None) -> dict:
                if piece is None:  # OpenAI's first chunk: the role, no content yet
                    delta: dict[str, Any] = {"role": "assistant", "content": ""}
                else:
                    delta = {"content": piece} if piece else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(request, handle, body.model, chunk, include)
        text, reason = await answer(request, handle, body.model)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": reason}],
                             "usage": _usage(handle)})

    # ---- classification ------------------------------------------------------------------------------
    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        _note(request, body.model)
        check_body(body, max_input_chars)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise RequestError(400, "input must be a string or a non-empty list of strings")
        if len(texts) > MAX_INPUTS:
            raise RequestError(413, f"input holds {len(texts)} texts; send at most {MAX_INPUTS} per request")
        results = await _unless_gone(request, scheduler.classify(body.model, texts), deadline(), lambda: None)
        data = [{"index": i, "label": max(r.probabilities, key=r.probabilities.__getitem__) if r.probabilities
                 else None, "probabilities": r.probabilities, "truncated": r.truncated}
                for i, r in enumerate(results)]
        return JSONResponse({"object": "classification", "model": body.model, "data": data})

    # ---- information ---------------------------------------------------------------------------------
    def model_card(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "multitune", "kind": spec.get("kind"),
                "method": spec.get("method"), "labels": list(spec.get("labels") or []),
                "version": spec.get("version"), "base": model_name or None}

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list",
                             "data": [model_card(name, spec) for name, spec in sorted(scheduler.tasks().items())]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> Response:
        _note(request, name)
        tasks = scheduler.tasks()
        if name not in tasks:
            raise RequestError(404, f"unknown task '{name}'; served tasks: {', '.join(sorted(tasks)) or 'none'}")
        return JSONResponse(model_card(name, tasks[name]))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "tasks": len(scheduler.tasks()), "model": model_name or None})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---- admin ---------------------------------------------------------------------------------------
    def confined(path: str) -> str:
        """``path`` resolved (symlinks followed, ``..`` gone) when it lies in a folder the server may load
        from; else 403. The message names the path as given, never anything read from it."""
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
            raise RequestError(400, f"path {path!r} cannot be resolved ({type(error).__name__})") from error
        if any(resolved.is_relative_to(root) for root in roots):
            return str(resolved)
        allowed = ", ".join(str(root) for root in roots) or "none"
        raise RequestError(403, f"path {path!r} is outside the folders this server may load from ({allowed}); "
                                "start it with --allow-load-from DIR to allow another folder")

    @app.post("/admin/load", summary="Serve one more task from a run or adapter folder")
    async def load(body: LoadRequest, request: Request) -> Response:
        check_body(body, MAX_PATH_CHARS)
        info = await scheduler.load(body.model, confined(body.path))
        _note(request, body.model)
        return JSONResponse({"object": "task", "model": body.model, "name": body.model, "loaded": True,
                             **dict(info or {})})

    @app.post("/admin/unload", summary="Stop serving a task")
    async def unload(body: UnloadRequest, request: Request) -> Response:
        check_body(body, MAX_PATH_CHARS)
        await scheduler.unload(body.model)
        return JSONResponse({"object": "task", "model": body.model, "name": body.model, "unloaded": True})

    @app.post("/admin/reload", summary="Replace a task by a new version, atomically")
    async def reload(body: ReloadRequest, request: Request) -> Response:
        check_body(body, MAX_PATH_CHARS)
        info = await scheduler.reload(body.model, None if body.path is None else confined(body.path))
        _note(request, body.model)
        return JSONResponse({"object": "task", "model": body.model, "name": body.model, "reloaded": True,
                             **dict(info or {})})

    return app


# ---- the command -------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port "
                              "or --host") from error


def serve(paths: str | Path | Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch_size: int = 32, max_wait_ms: float = 5, queue_size: int = 256,
          timeout_s: float = 60, model: str | None = None, device: str | None = None, log_level: str = "info",
          threads: int | None = None, admin_key: str | None = None, insecure_no_admin_key: bool = False,
          allow_load_from: Sequence[str | Path] = (), max_input_chars: int = MAX_INPUT_CHARS,
          max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
    """Serve every task under ``paths`` (banks, folders of runs, runs, adapter folders; see
    :func:`multitune.engine.find_adapters`) until interrupted.

    Keys default to ``$MULTITUNE_API_KEY`` and ``$MULTITUNE_ADMIN_KEY``. On an address other machines can
    reach, the server refuses to start without an admin key unless ``insecure_no_admin_key``.
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    for name, value, low in (("--max-batch-size", max_batch_size, 1), ("--queue-size", queue_size, 1),
                             ("--max-wait-ms", max_wait_ms, 0), ("--threads", 1 if threads is None else threads, 1),
                             ("--max-input-chars", max_input_chars, 1), ("--max-request-bytes", max_request_bytes, 1)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low} (got {value})")
    if not timeout_s > 0:
        raise ConfigError(f"--timeout must be > 0 seconds (got {timeout_s})")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535 (got {port})")
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(f"{path} is not a folder; give a bank folder (BANK/TASK/adapter.json), a folder of "
                              "run folders, a run folder or an adapter folder")
    for path in allow_load_from:
        if not Path(path).is_dir():
            raise ConfigError(f"--allow-load-from {path} is not a folder; name an existing folder")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    if admin_key is None and api_key is None and not _is_loopback(host):
        if not insecure_no_admin_key:
            raise ConfigError(f"--host {host} can be reached from other machines and the server has no admin key, "
                              f"so anyone could load and unload tasks; set --admin-key (or ${ADMIN_KEY_ENV}, or "
                              "--api-key), or pass --insecure-no-admin-key to serve without one")
        print(f"warning: no admin key: anyone who reaches {host}:{port} can load and unload tasks "
              "(--insecure-no-admin-key)", file=sys.stderr)
    _check_port(host, port)

    import uvicorn

    from multitune.engine import Engine
    from multitune.scheduler import Scheduler, in_passing_thread

    if threads:
        import torch

        torch.set_num_threads(threads)  # read by every thread that starts a parallel region
    engine = in_passing_thread(lambda: Engine.from_folder(paths, model, device))
    scheduler = Scheduler(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, queue_size=queue_size,
                          timeout_s=timeout_s)
    app = create_app(scheduler, api_key=api_key, model_name=str(engine.base.source), admin_key=admin_key,
                     load_from=[*paths, *allow_load_from], max_input_chars=max_input_chars,
                     max_request_bytes=max_request_bytes)
    names = ", ".join(sorted(engine.tasks))
    print(f"serving {len(engine.tasks)} task(s) ({names}) on {engine.base.source} at http://{host}:{port}",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="what to serve: bank folders (BANK/TASK/adapter.json), folders of run folders "
                             "(BANK/RUN/adapter), run folders or adapter folders; a task is named after its folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", help=f"key every endpoint but /health requires as 'Authorization: Bearer KEY' "
                                          f"(default: ${API_KEY_ENV}; none: open)")
    parser.add_argument("--admin-key", help=f"key /admin/* requires (default: ${ADMIN_KEY_ENV}, else the API key; "
                                            "required on a --host other machines can reach)")
    parser.add_argument("--insecure-no-admin-key", action="store_true",
                        help="serve on a non-loopback --host without an admin key: anyone may load and unload tasks")
    parser.add_argument("--allow-load-from", action="append", default=[], metavar="DIR",
                        help="a folder /admin/load and /admin/reload may read from, besides the served ones "
                             "(repeatable)")
    parser.add_argument("--max-input-chars", type=int, default=MAX_INPUT_CHARS,
                        help=f"characters of one text (prompt, message, input); beyond it 413 "
                             f"(default: {MAX_INPUT_CHARS})")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help=f"bytes of one request body; beyond it 413 (default: {MAX_REQUEST_BYTES})")
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows in one forward (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long an idle server waits for a batch to fill (default: 5)")
    parser.add_argument("--queue-size", type=int, default=256,
                        help="requests that may wait; beyond it the server answers 429 (default: 256)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take (default: 60)")
    parser.add_argument("--model", help="base model to load the adapters onto (default: the one they record)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for the model's forwards (default: torch's, one per core)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level (default: info)")


def cmd_serve(args: argparse.Namespace) -> None:
    serve(args.paths, host=args.host, port=args.port, api_key=args.api_key, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, timeout_s=args.timeout, model=args.model,
          device=args.device, log_level=args.log_level, threads=args.threads, admin_key=args.admin_key,
          insecure_no_admin_key=args.insecure_no_admin_key, allow_load_from=args.allow_load_from,
          max_input_chars=args.max_input_chars, max_request_bytes=args.max_request_bytes)


__all__ = ["create_app", "serve", "add_serve_arguments", "cmd_serve", "error_response", "validation_message",
           "Metrics"]
