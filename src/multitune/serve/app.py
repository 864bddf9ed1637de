"""The HTTP API: many tasks behind OpenAI-compatible endpoints, over one :class:`~multitune.serve.scheduler.Scheduler`.

The HTTP layer only translates: it parses and checks requests (:mod:`multitune.serve.openai`), hands them to the
scheduler (which owns the model and batches rows of every task into shared forwards), and turns the answers,
streams and errors into OpenAI's shapes. The ``model`` field of a request names the task.

Endpoints: ``POST /v1/completions`` and ``/v1/chat/completions`` (``stream: true`` gives server-sent events),
``POST /v1/classify``, ``POST /v1/embeddings``, ``POST /v1/feedback`` (:mod:`multitune.serve.feedback`), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/monitor`` and the ``/monitor`` page
(:mod:`multitune.serve.monitor_routes`) and the admin endpoints ``POST /admin/load``,
``/admin/unload``, ``/admin/reload``. Each route is a module function that
reads the server's :class:`Served` state from ``request.app.state``; :func:`create_app` only assembles them.

Keys, as vLLM does: with an API key every endpoint but ``/health`` needs ``Authorization: Bearer KEY``;
``/admin/*`` needs the admin key, which is the API key unless one of its own is given
(:class:`~multitune.serve.guard.Guard` checks them and the body limit). The admin endpoints load only from the
served folders and those named with ``--allow-load-from``.

Limits: a body over ``max_request_bytes`` and a text over ``max_input_chars`` are a 413 naming the limit;
classification inputs longer than the task's ``max_length`` tokens are cut as in training, and the answer's
``truncated`` says so. No input crashes the server: every mistake is a 4xx with one line naming the field and
the fix; an unexpected failure is a 500 for that request alone. A full queue answers 429, a request past the
scheduler's deadline 504, and a client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from multitune.errors import MultituneError
from multitune.serve.decode import RequestError
from multitune.serve.feedback import router as feedback_router
from multitune.serve.follow import VersionWatch
from multitune.serve.guard import MAX_INPUT_CHARS, MAX_REQUEST_BYTES, Guard
from multitune.serve.monitor_routes import install as install_monitor
from multitune.serve.observe import Metrics
from multitune.serve.openai import (
    CLIENT_GONE,
    ChatRequest,
    ClassifyRequest,
    ClientGone,
    CompletionRequest,
    EmbeddingRequest,
    EventStream,
    LoadRequest,
    ReloadRequest,
    UnloadRequest,
    chat_logprobs,
    chat_messages,
    check_body,
    completion_logprobs,
    completion_prompt,
    error_body,
    error_response,
    finish_reason,
    sampling_params,
    sse,
    validation_message,
)

log = logging.getLogger("multitune.serve")
T = TypeVar("T")

MAX_INPUTS = 1024  # texts in one /v1/classify request
MAX_PATH_CHARS = 4096  # an admin body's path (Linux's PATH_MAX), whatever --max-input-chars says
GRACE_S = 10.0  # the server's own deadline is the scheduler's plus this (a safety net: the scheduler times out first)
DISCONNECT_POLL_S = 0.2

router = APIRouter()


@dataclass
class Served:
    """What every route reads: the scheduler, the metrics, the base's name, the limits, the loadable folders,
    and the feedback store answers are recorded in (None: none kept)."""

    scheduler: Any
    metrics: Metrics
    model_name: str
    max_input_chars: int
    roots: list[Path]
    store: Any = None  # a multitune.health.store.FeedbackStore
    versions: VersionWatch | None = None  # follows the tasks' folder versions (None: off)

    def remember(
        self, rid: str, task: str, kind: str, prediction: str | None, probabilities: Any, text: str
    ) -> None:
        """Record an answer under its id for later feedback (queued: the store writes off this thread)."""
        if self.store is not None:
            self.store.record(rid, task, kind, prediction, probabilities, text)

    def deadline(self) -> float:
        return float(getattr(self.scheduler, "timeout_s", 60.0) or 60.0) + GRACE_S


def _served(request: Request) -> Served:
    return request.app.state.served


def _note(request: Request, task: str) -> None:
    """Tell the metrics middleware which task the request was for."""
    info = request.scope.get("multitune")
    if info is not None:
        info["task"] = task


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(
    scheduler: Any,
    api_key: str | None = None,
    model_name: str = "",
    *,
    admin_key: str | None = None,
    load_from: Sequence[str | Path] = (),
    max_input_chars: int = MAX_INPUT_CHARS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    store: Any = None,
    watch_versions: float = 0,
) -> FastAPI:
    """The HTTP API over a :class:`~multitune.serve.scheduler.Scheduler` (started and stopped with the app).

    ``api_key``: every endpoint but ``/health`` needs ``Authorization: Bearer api_key``. ``admin_key``: what
    ``/admin/*`` needs (default: ``api_key``; neither: admin is open). ``load_from``: the folders whose
    contents ``/admin/load`` and ``/admin/reload`` may read (symlinks followed; none: no path is accepted).
    ``model_name``: the base model, reported by ``/health`` and ``/v1/models``. ``store``: the
    :class:`~multitune.health.store.FeedbackStore` answers and feedback go to (closed with the app).
    ``watch_versions``: every so many seconds, reload each task whose folder's current version moved
    (:class:`~multitune.serve.follow.VersionWatch`; 0: never).
    """
    served = Served(
        scheduler,
        Metrics(scheduler),
        model_name,
        max_input_chars,
        [Path(root).resolve() for root in load_from],
        store,
        VersionWatch(scheduler, watch_versions) if watch_versions > 0 else None,
    )
    app = FastAPI(
        title="multitune", summary="Many tasks from one frozen base, OpenAI-compatible", lifespan=_lifespan
    )
    app.state.served = served
    app.state.scheduler, app.state.metrics = scheduler, served.metrics
    app.add_middleware(
        Guard,
        metrics=served.metrics,
        api_key=api_key,
        admin_key=admin_key,
        max_request_bytes=max_request_bytes,
    )
    for error, handler in (
        (RequestValidationError, _invalid),
        (RequestError, _refused),
        (MultituneError, _mistaken),
        (StarletteHTTPException, _http_error),
        (ClientGone, _gone),
    ):
        app.add_exception_handler(error, handler)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(feedback_router)
    install_monitor(app)  # GET /v1/monitor, GET /monitor, the per-task gauges on /metrics
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    served: Served = app.state.served
    served.scheduler.start()

    async def drain() -> None:  # keep the histogram fed even when nobody scrapes /metrics for a while
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                served.metrics.drain_batches()

    background = [asyncio.create_task(drain())]
    if served.versions is not None:
        background.append(asyncio.create_task(served.versions.follow()))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await asyncio.to_thread(served.scheduler.stop)
        if served.store is not None:  # every answer recorded so far is committed
            await asyncio.to_thread(served.store.close)


# ---- errors ------------------------------------------------------------------------------------------------
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(error.errors()))
    return error_response(400, message, param)


async def _refused(request: Request, error: RequestError) -> JSONResponse:
    status = error.status if isinstance(getattr(error, "status", None), int) else 400
    return error_response(status, " ".join(str(error).split()))


async def _mistaken(request: Request, error: MultituneError) -> JSONResponse:
    return error_response(400, " ".join(str(error).split()))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code == 404:
        message = (
            f"no endpoint {request.method} {request.url.path}; see /v1/models, /v1/completions, "
            "/v1/chat/completions, /v1/classify, /v1/feedback, /v1/monitor, /monitor, /health, /metrics"
        )
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    return error_response(error.status_code, message)


async def _gone(request: Request, error: ClientGone) -> Response:
    info = request.scope.get("multitune")
    if info is not None:
        info["status"] = CLIENT_GONE
    return Response(status_code=CLIENT_GONE)


# ---- waiting for the scheduler -------------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _unless_gone(
    request: Request, work: Awaitable[T], deadline: float, abandon: Callable[[], None]
) -> T:
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
        raise ClientGone()
    raise RequestError(
        504, f"no answer within {deadline:g} s; retry, ask for fewer tokens or raise --timeout"
    )


def _count_tokens(served: Served, task: str, handle: Any) -> None:
    served.metrics.tokens.labels(task=served.metrics.task_label(task)).inc(int(handle.completion_tokens or 0))


async def _compile_format(served: Served, task: str, params: Any) -> None:
    """The request's response_format compiled on a thread (a large schema takes a while), not on the loop."""
    if params.response_format is not None:
        await asyncio.to_thread(served.scheduler.compile_format, task, params)


def _submit(served: Served, task: str, prompt: str, params: Any, n: int | None) -> list[Any]:
    """The request's rows: one handle, or ``n`` samples of the prompt sharing its prefill."""
    if n in (None, 1):
        return [served.scheduler.submit_generate(task, prompt, params)]
    return list(served.scheduler.submit_many(task, prompt, params, n))


def _usage(handles: list[Any]) -> dict[str, int]:
    """One prompt's tokens (its n samples share it, as OpenAI counts them), every sample's completion tokens."""
    prompt = int(handles[0].prompt_tokens)
    completion = sum(int(h.completion_tokens) for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _answers(request: Request, handles: list[Any], task: str) -> list[tuple[str, str]]:
    """Every handle's (text, finish_reason); a client gone cancels all of them."""
    if len(handles) == 1:
        return [await _answer(request, handles[0], task)]
    served = _served(request)

    def cancel() -> None:
        for h in handles:
            h.cancel()

    try:
        return list(
            await _unless_gone(
                request, asyncio.gather(*(h.result() for h in handles)), served.deadline(), cancel
            )
        )
    finally:
        for h in handles:
            _count_tokens(served, task, h)


async def _answer(request: Request, handle: Any, task: str) -> tuple[str, str]:
    served = _served(request)
    try:
        return await _unless_gone(request, handle.result(), served.deadline(), handle.cancel)
    finally:
        _count_tokens(served, task, handle)


def _stream(
    request: Request,
    handles: list[Any],
    task: str,
    chunk: Callable[[str | None, str | None, int, list | None], dict],
    include_usage: bool,
    done: Callable[[], None] = lambda: None,
) -> EventStream:
    """The generation as server-sent events: ``chunk(piece, finish_reason, index, logprobs)`` shapes each
    event of choice ``index`` (the n samples' pieces interleaved as they come; with logprobs each piece carries
    its tokens' entries); a client that goes away cancels every row, and the tokens are counted once however
    the stream ends. ``done()`` runs when the generation is complete (its answer can be recorded)."""
    served = _served(request)
    state = {"finished": False, "counted": False}
    with_logprobs = handles[0].params.logprobs is not None

    close = _closer(served, task, handles, state, request.scope.get("multitune"))
    sent = [0] * len(handles)  # logprob entries already streamed, per choice

    def event(index: int, piece: str, count: int) -> str:
        """One piece of choice ``index`` with its tokens' logprob entries; "" ends the choice."""
        entries = None
        if with_logprobs:
            entries = served.scheduler.token_logprobs(handles[index], sent[index], count)
            sent[index] = max(sent[index], count)
        reason = None if piece else finish_reason(handles[index])
        return sse(chunk(piece, reason, index, entries))

    async def events() -> AsyncIterator[str]:
        try:
            for first in (chunk(None, None, index, None) for index in range(len(handles))):
                if first:
                    yield sse(first)
            async for index, piece, count in _interleave(handles, served.deadline()):
                yield event(index, piece, count)
            state["finished"] = True
            done()
            if include_usage:
                yield sse({**chunk("", None, 0, None), "choices": [], "usage": _usage(handles)})
            yield "data: [DONE]\n\n"
        except RequestError as error:  # the scheduler ended it (timeout, shutdown): say so in the stream
            state["finished"] = True
            yield sse(error_body(error.status, " ".join(str(error).split())))
            yield "data: [DONE]\n\n"
        except TimeoutError:  # the server's own deadline: the scheduler did not answer
            yield sse(error_body(504, f"no answer within {served.deadline():g} s; retry or raise --timeout"))
            yield "data: [DONE]\n\n"
        except Exception as error:  # noqa: BLE001  (headers are sent: report in the stream, not as a 500)
            log.exception("stream of task %r failed", task)
            yield sse(error_body(500, f"internal error ({type(error).__name__}: {error})"))
            yield "data: [DONE]\n\n"
        finally:
            close()

    return EventStream(events(), close)


def _closer(
    served: Served, task: str, handles: list[Any], state: dict[str, bool], info: dict | None
) -> Callable[[], None]:
    """What ends a stream, however it ends: unfinished rows cancelled (the client went away) and every
    row's tokens counted, once."""

    def close() -> None:
        if not state["finished"]:
            state["finished"] = True
            for handle in handles:
                with contextlib.suppress(Exception):
                    handle.cancel()
            if info is not None:
                info["status"] = CLIENT_GONE
        if not state["counted"]:
            state["counted"] = True
            for handle in handles:
                _count_tokens(served, task, handle)

    return close


async def _interleave(handles: list[Any], deadline: float) -> AsyncIterator[tuple[int, str, int]]:
    """(choice index, piece, logprob entries so far) of every handle as they come, each one's ("", n) last.
    The deadline spans only the waits for pieces, never a yield (a slow reader is not the scheduler's fault,
    and a timeout must not fire while Starlette is sending); a handle's error is raised here."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: Any) -> None:
        try:
            async for piece, count in handle.stream_counted():
                await out.put((index, piece, count, None))
        except Exception as error:  # noqa: BLE001  (raised below, in the stream)
            await out.put((index, None, 0, error))
            return
        await out.put((index, None, 0, None))

    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(handles)
        while running:
            index, piece, count, error = await asyncio.wait_for(out.get(), max(0.0, end - loop.time()))
            if error is not None:
                raise error
            if piece is None:
                running -= 1
            else:
                yield index, piece, count
    finally:
        for job in pumps:
            job.cancel()


# ---- generation --------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    served = _served(request)
    _note(request, body.model)
    check_body(body, served.max_input_chars)
    prompt = completion_prompt(body)
    params = sampling_params(body, body.max_tokens)
    await _compile_format(served, body.model, params)
    handles = _submit(served, body.model, prompt, params, body.n)  # on the loop: the stream needs it
    handle = handles[0]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    # each choice's streamed tokens' characters so far: a chunk's text_offset continues from there, as the
    # whole answer's count from 0
    streamed = [0] * len(handles)

    def chunk(piece: str | None, reason: str | None, index: int = 0, entries: list | None = None) -> dict:
        if piece is None:
            return {}
        logprobs = None if entries is None else completion_logprobs(entries, streamed[index])
        streamed[index] += sum(len(token) for token, _, _ in entries or [])
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [{"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason}],
        }

    def done() -> None:
        served.remember(rid, body.model, "generation", handle.text, None, prompt)

    if body.stream:
        return _stream(
            request,
            handles,
            body.model,
            chunk,
            bool(body.stream_options and body.stream_options.include_usage),
            done,
        )
    answers = await _answers(request, handles, body.model)
    served.remember(rid, body.model, "generation", answers[0][0], None, prompt)
    choices = [
        {
            "index": i,
            "text": prompt + text if body.echo else text,
            "logprobs": None
            if params.logprobs is None
            else completion_logprobs(served.scheduler.token_logprobs(h)),
            "finish_reason": reason,
        }
        for i, (h, (text, reason)) in enumerate(zip(handles, answers, strict=True))
    ]
    return JSONResponse({**chunk("", None), "choices": choices, "usage": _usage(handles)})


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request) -> Response:
    served = _served(request)
    _note(request, body.model)
    check_body(body, served.max_input_chars)
    if not body.messages:
        raise RequestError(400, "messages must hold at least one {role, content} message")
    params = sampling_params(body, body.max_completion_tokens if body.max_tokens is None else body.max_tokens)
    prompt = served.scheduler.chat_prompt(body.model, chat_messages(body))
    await _compile_format(served, body.model, params)
    handles = _submit(served, body.model, prompt, params, body.n)
    handle = handles[0]
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(piece: str | None, reason: str | None, index: int = 0, entries: list | None = None) -> dict:
        if piece is None:  # OpenAI's first chunk of each choice: the role, no content yet
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            delta = {"content": piece} if piece else {}
        logprobs = None if entries is None else chat_logprobs(entries)
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
        }

    def done() -> None:
        served.remember(rid, body.model, "generation", handle.text, None, prompt)

    if body.stream:
        return _stream(
            request,
            handles,
            body.model,
            chunk,
            bool(body.stream_options and body.stream_options.include_usage),
            done,
        )
    answers = await _answers(request, handles, body.model)
    served.remember(rid, body.model, "generation", answers[0][0], None, prompt)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None
            if params.logprobs is None
            else chat_logprobs(served.scheduler.token_logprobs(h)),
            "finish_reason": reason,
        }
        for i, (h, (text, reason)) in enumerate(zip(handles, answers, strict=True))
    ]
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(handles),
        }
    )


# ---- classification ----------------------------------------------------------------------------------------
@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request) -> Response:
    served = _served(request)
    _note(request, body.model)
    check_body(body, served.max_input_chars)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise RequestError(400, "input must be a string or a non-empty list of strings")
    if len(texts) > MAX_INPUTS:
        raise RequestError(413, f"input holds {len(texts)} texts; send at most {MAX_INPUTS} per request")
    results = await _unless_gone(
        request, served.scheduler.classify(body.model, texts), served.deadline(), lambda: None
    )
    data = [
        {
            "id": f"cls-{uuid.uuid4().hex[:24]}",  # what POST /v1/feedback names the row by
            "index": i,
            "label": max(r.probabilities, key=r.probabilities.__getitem__) if r.probabilities else None,
            "probabilities": r.probabilities,
            "truncated": r.truncated,
        }
        for i, r in enumerate(results)
    ]
    for row, text in zip(data, texts, strict=True):
        served.remember(row["id"], body.model, "classification", row["label"], row["probabilities"], text)
    return JSONResponse({"object": "classification", "model": body.model, "data": data})


# ---- embeddings --------------------------------------------------------------------------------------------
@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """OpenAI's embeddings: each text's mean-pooled, L2-normalised last hidden state, through the adapter of
    the task ``model`` names (any kind), or of the bare base when ``model`` is the base's name."""
    served = _served(request)
    _note(request, body.model)
    if isinstance(body.input, list) and body.input and not all(isinstance(t, str) for t in body.input):
        raise RequestError(
            400, "input must be a string or a list of strings; token-id arrays are not accepted"
        )
    check_body(body, served.max_input_chars)
    texts = [body.input] if isinstance(body.input, str) else [str(t) for t in body.input]
    if not texts:
        raise RequestError(400, "input must be a string or a non-empty list of strings")
    if len(texts) > MAX_INPUTS:
        raise RequestError(413, f"input holds {len(texts)} texts; send at most {MAX_INPUTS} per request")
    bare = body.model == served.model_name and body.model not in served.scheduler.tasks()
    rows = await _unless_gone(
        request, served.scheduler.embed(None if bare else body.model, texts), served.deadline(), lambda: None
    )
    size = len(rows[0][0])
    if body.dimensions is not None and body.dimensions != size:
        raise RequestError(
            400,
            f"dimensions {body.dimensions} is not available: '{body.model}' embeds in {size}; omit dimensions",
        )
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
        for i, (vector, _) in enumerate(rows)
    ]
    tokens = sum(n for _, n in rows)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


def _encoded(vector: list[float], fmt: str) -> list[float] | str:
    """OpenAI's two encodings: the floats, or base64 of their little-endian float32 bytes (the openai client's
    default, which it decodes with numpy)."""
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# ---- information -------------------------------------------------------------------------------------------
def _model_card(served: Served, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "multitune",
        "kind": spec.get("kind"),
        "method": spec.get("method"),
        "labels": list(spec.get("labels") or []),
        "version": spec.get("version"),
        "task_version": spec.get("task_version"),
        "base": served.model_name or None,
    }


@router.get("/v1/models")
async def models(request: Request) -> Response:
    served = _served(request)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                _model_card(served, name, spec) for name, spec in sorted(served.scheduler.tasks().items())
            ],
        }
    )


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request) -> Response:
    served = _served(request)
    _note(request, name)
    tasks = served.scheduler.tasks()
    if name not in tasks:
        raise RequestError(404, f"unknown task '{name}'; served tasks: {', '.join(sorted(tasks)) or 'none'}")
    return JSONResponse(_model_card(served, name, tasks[name]))


@router.get("/health")
async def health(request: Request) -> Response:
    served = _served(request)
    return JSONResponse(
        {"status": "ok", "tasks": len(served.scheduler.tasks()), "model": served.model_name or None}
    )


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(_served(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---- admin -------------------------------------------------------------------------------------------------
def _confined(served: Served, path: str) -> str:
    """``path`` resolved (symlinks followed, ``..`` gone) when it lies in a folder the server may load from;
    else 403. The message names the path as given, never anything read from it."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
        raise RequestError(400, f"path {path!r} cannot be resolved ({type(error).__name__})") from error
    if any(resolved.is_relative_to(root) for root in served.roots):
        return str(resolved)
    allowed = ", ".join(str(root) for root in served.roots) or "none"
    raise RequestError(
        403,
        f"path {path!r} is outside the folders this server may load from ({allowed}); "
        "start it with --allow-load-from DIR to allow another folder",
    )


@router.post("/admin/load", summary="Serve one more task from a run or adapter folder")
async def load(body: LoadRequest, request: Request) -> Response:
    served = _served(request)
    check_body(body, MAX_PATH_CHARS)
    info = await served.scheduler.load(body.model, _confined(served, body.path))
    _note(request, body.model)
    return JSONResponse(
        {"object": "task", "model": body.model, "name": body.model, "loaded": True, **dict(info or {})}
    )


@router.post("/admin/unload", summary="Stop serving a task")
async def unload(body: UnloadRequest, request: Request) -> Response:
    check_body(body, MAX_PATH_CHARS)
    await _served(request).scheduler.unload(body.model)
    return JSONResponse({"object": "task", "model": body.model, "name": body.model, "unloaded": True})


@router.post("/admin/reload", summary="Replace a task by a new version, atomically")
async def reload(body: ReloadRequest, request: Request) -> Response:
    """Without a path, the task is loaded again from what it was loaded from: a run or bank task folder gives
    its current version (what ``multitune promote`` or a rollback pointed it at)."""
    served = _served(request)
    check_body(body, MAX_PATH_CHARS)
    path = None if body.path is None else _confined(served, body.path)
    info = await served.scheduler.reload(body.model, path)
    _note(request, body.model)
    return JSONResponse(
        {"object": "task", "model": body.model, "name": body.model, "reloaded": True, **dict(info or {})}
    )
