"""OpenAI's shapes: the request bodies the HTTP API accepts, the answers and errors it gives.

Requests are pydantic models (unknown fields ignored, as OpenAI clients send many this server has no use for);
:func:`check_body` checks every text of one before anything is queued; :func:`sampling_params` turns the
sampling fields into checked :class:`~multitune.serve.decode.SamplingParams`. Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with one line naming the field and the fix; streams are
server-sent events (:class:`EventStream`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from multitune.serve.constrained import parse_response_format
from multitune.serve.decode import RequestError, SamplingParams, check_text

CLIENT_GONE = 499  # nginx's "client closed request": what the metrics record for an abandoned request


class ClientGone(Exception):
    """The client disconnected before its answer: nobody reads the response."""


# ---- requests ----------------------------------------------------------------------------------------
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
    response_format: Any = None  # checked by serve.constrained.parse_response_format


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
    top_logprobs: int | None = None


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``: OpenAI's fields; ``model`` is a served task (its adapter applies) or the base."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


_TASK_FIELD = (
    "the task's public name, as in the 'model' field of the other endpoints ('name' is accepted too)"
)


class LoadRequest(_Body):
    """``POST /admin/load``: serve one more task, read from a folder the server may load from."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"), description=_TASK_FIELD)
    path: str = Field(
        min_length=1,
        description="a run folder (RUN, as 'multitune train --output RUN' writes it) or "
        "an adapter folder (RUN/adapter, BANK/TASK), inside the served "
        "folders or a folder named with --allow-load-from",
    )


class UnloadRequest(_Body):
    """``POST /admin/unload``: stop serving a task (requests already running on it finish first)."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"), description=_TASK_FIELD)


class ReloadRequest(_Body):
    """``POST /admin/reload``: replace a served task by a new version, atomically (running requests finish on
    the old one)."""

    model: str = Field(min_length=1, validation_alias=AliasChoices("model", "name"), description=_TASK_FIELD)
    path: str | None = Field(
        None,
        description="where to read the new version (as for /admin/load); default: the "
        "folder the task was loaded from (a task folder: its current version, multitune promote/rollback)",
    )


# ---- errors ------------------------------------------------------------------------------------------------
def error_type(status: int) -> str:
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
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    headers = (
        {"Retry-After": "1"} if status == 429 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
    )
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
                raise RequestError(
                    413,
                    f"{field} holds {len(value)} characters; this server takes at most "
                    f"{max_chars} per text (its --max-input-chars)",
                )
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{field}.{name}" if field else name)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{field}.{i}")

    walk(body, "")


# ---- answers --------------------------------------------------------------------------------------------
def request_logprobs(body: _Sampling) -> int | None:
    """How many alternatives per token the request asks for (None: no logprobs). Completions send
    ``logprobs: k``; chat sends ``logprobs: true`` with ``top_logprobs: k``."""
    if isinstance(body, ChatRequest):
        if body.logprobs not in (None, False, True):
            raise RequestError(400, f"logprobs must be true or false (got {body.logprobs!r})")
        if not body.logprobs:
            if body.top_logprobs not in (None, 0):
                raise RequestError(400, "top_logprobs needs logprobs: true")
            return None
        return 0 if body.top_logprobs is None else body.top_logprobs
    if body.logprobs is None:
        return None
    if not isinstance(body.logprobs, int) or isinstance(body.logprobs, bool):
        raise RequestError(400, f"logprobs must be an integer number of alternatives (got {body.logprobs!r})")
    return body.logprobs


def sampling_params(body: _Sampling, max_tokens: int | None) -> SamplingParams:
    """OpenAI's sampling fields as checked SamplingParams (defaults where the client sent nothing or null)."""
    n = 1 if body.n is None else body.n
    if not isinstance(n, int) or n < 1:
        raise RequestError(400, f"n must be an integer >= 1 (got {body.n!r})")
    logprobs = request_logprobs(body)
    defaults = SamplingParams()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
        logprobs=logprobs,
        response_format=parse_response_format(body.response_format),
    )
    params.validate()
    return params


def completion_logprobs(
    entries: list[tuple[str, float, list[tuple[str, float]]]], start: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy completions shape: parallel lists, offsets into the completion's text (a streamed
    chunk's from ``start``, the characters of the tokens streamed before it)."""
    offsets, at = [], start
    for token, _, _ in entries:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": [token for token, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [dict(top) for _, _, top in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """OpenAI's chat shape: one object per token with its UTF-8 bytes and its alternatives."""

    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**one(token, lp), "top_logprobs": [one(t, alp) for t, alp in top]} for token, lp, top in entries
        ],
        "refusal": None,
    }


def completion_prompt(body: CompletionRequest) -> str:
    if body.echo and (body.logprobs is not None or body.stream):
        raise RequestError(
            400,
            "echo is served without logprobs and stream (the prompt's own log-probabilities are not "
            "computed); leave out logprobs or stream, or echo",
        )
    if body.best_of not in (None, 1):
        raise RequestError(400, f"best_of must be 1 (got {body.best_of}); leave it out")
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise RequestError(
            400, f"prompt must be one string (got a list of {len(body.prompt)}); send one request per prompt"
        )
    return body.prompt[0]


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for message in body.messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content if part.type == "text")
        out.append({"role": message.role, "content": content or ""})
    return out


def finish_reason(handle: Any) -> str:
    return getattr(handle, "finish_reason", None) or "stop"


def usage(handle: Any) -> dict[str, int]:
    prompt, completion = int(handle.prompt_tokens), int(handle.completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that always run ``on_close`` when the response ends, however it ends (done,
    client gone, server stopping): that is where an unfinished generation is cancelled."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
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
