"""An in-memory stand-in for :class:`multitune.serve.scheduler.Scheduler`, for testing the HTTP layer without a model.

Two tasks: "sentiment" (classification, labels neg/pos: pos when the text has more positive words than
negative ones among its first ``MAX_LENGTH`` words; a longer text is answered ``truncated``) and "echo"
(generation: the prompt's words reversed, one word per piece, the first bare and the next with a leading
space). ``max_tokens`` counts words, stop strings cut the text as the real scheduler does, ``delay`` seconds
pass before each piece (so that streams, cancellations and timeouts take measurable time), and ``hold()`` /
``release()`` stop every request at the door (so that tests can fill the queue). Its ``stats`` is the real
scheduler's :class:`~multitune.serve.observe.Stats` (one "decode" batch per piece, one "classify" per request).

It records what the server did to it: ``cancelled`` (the prompts of cancelled generations), ``handles`` (every
generation submitted, with the task version it was admitted under), ``started`` / ``stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from multitune.serve.decode import QueueFull, RequestError, SamplingParams
from multitune.serve.engine import Classification
from multitune.serve.observe import Stats

POSITIVE = {"good", "great", "fine", "nice", "happy", "love", "excellent"}
NEGATIVE = {"bad", "awful", "poor", "sad", "hate", "terrible"}
CONTEXT = 512  # words: a prompt plus max_tokens beyond it is refused, as the real scheduler does with tokens
MAX_LENGTH = (
    64  # words of a text to classify: the rest is cut (and the answer says truncated), as with tokens
)
_DONE = object()


class FakeHandle:
    def __init__(
        self, owner: FakeScheduler, task: str, prompt: str, params: SamplingParams, version: int
    ) -> None:
        self.owner, self.task, self.prompt, self.params, self.version = owner, task, prompt, params, version
        self.prompt_tokens = len(prompt.split())
        self.completion_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.error: RequestError | None = None
        self.cancelled = False
        self.deadline = time.monotonic() + owner.timeout_s
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue = asyncio.Queue()
        self._sync: queue.Queue = queue.Queue()
        self._done = asyncio.Event()
        self._task = self._loop.create_task(self._run())

    # ---- the "model" -------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while self.owner.held.is_set():  # hold(): wait at the door, still cancellable and timing out
                if self._should_end():
                    return
                await asyncio.sleep(0.01)
            words = self.prompt.split()[::-1]
            for word in words:
                if self._should_end():
                    return
                await asyncio.sleep(self.owner.delay)
                if self._should_end():
                    return
                full = f"{self.text} {word}" if self.text else word
                cut = _first_stop(full, self.params.stop)
                if cut is not None:
                    self.emit(full[:cut][len(self.text) :])
                    self.finish("stop")
                    return
                self.emit(full[len(self.text) :])
                self.completion_tokens += 1
                self.owner.stats.record("decode", 1)
                if self.completion_tokens >= self.params.max_tokens:
                    self.finish("length")
                    return
            self.finish("stop")
        finally:
            self.owner._leave(self)

    def _should_end(self) -> bool:
        if self.cancelled:
            self.finish("cancelled")
            return True
        if self.owner.stopped:
            self.finish("error", RequestError(503, "the server is shutting down"))
            return True
        if time.monotonic() > self.deadline:
            self.finish(
                "timeout", RequestError(504, f"the request took longer than {self.owner.timeout_s:g} s")
            )
            return True
        return False

    def emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._pieces.put_nowait(piece)
            self._sync.put(piece)

    def finish(self, reason: str, error: RequestError | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._pieces.put_nowait(_DONE)
        self._sync.put(_DONE)

    # ---- the Handle interface ----------------------------------------------------------------------
    def cancel(self) -> None:
        if not self.cancelled and not self._done.is_set():
            self.owner.cancelled.append(self.prompt)
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def tokens(self) -> Iterator[str]:
        while (piece := self._sync.get()) is not _DONE:
            yield piece
        if self.error is not None:
            raise self.error

    async def stream(self) -> AsyncIterator[str]:
        while (piece := await self._pieces.get()) is not _DONE:
            yield piece
        if self.error is not None:
            raise self.error

    async def stream_counted(self) -> AsyncIterator[tuple[str, int]]:
        """As Handle's: (piece, logprob entries so far), then ("", all); the fake has none."""
        async for piece in self.stream():
            yield piece, 0
        yield "", 0

    async def result(self) -> tuple[str, str]:
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self.text, self.finish_reason or "stop"


class FakeScheduler:
    def __init__(self, delay: float = 0.0, queue_size: int = 64, timeout_s: float = 60.0) -> None:
        self.delay, self.queue_size, self.timeout_s = delay, queue_size, timeout_s
        self.stats = Stats()  # the real shape: the server drains it into its batch-size histogram
        self._tasks: dict[str, dict[str, Any]] = {
            "sentiment": {"kind": "classification", "method": "lora", "labels": ["neg", "pos"], "version": 1},
            "echo": {"kind": "generation", "method": "prompt", "labels": [], "version": 1},
        }
        self.sources: dict[str, str] = {}
        self.held = threading.Event()
        self.cancelled: list[str] = []
        self.handles: list[FakeHandle] = []
        self.fail_next: Exception | None = None  # raised by the next classify / submit_generate
        self.started = self.stopped = False
        self._pending = 0
        self._lock = threading.Lock()

    # ---- knobs for tests ---------------------------------------------------------------------------
    def hold(self) -> None:
        self.held.set()

    def release(self) -> None:
        self.held.clear()

    @property
    def pending(self) -> int:
        return self._pending

    def _enter(self) -> None:
        with self._lock:
            if self._pending >= self.queue_size:
                raise QueueFull(self._pending)
            self._pending += 1
            self.stats.queue_depth = self._pending

    def _leave(self, _: Any = None) -> None:
        with self._lock:
            self._pending -= 1
            self.stats.queue_depth = self._pending

    def _fail(self) -> None:
        error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error

    # ---- the Scheduler interface -------------------------------------------------------------------
    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def tasks(self) -> dict[str, dict[str, Any]]:
        return {name: dict(spec, labels=list(spec["labels"])) for name, spec in self._tasks.items()}

    def _resolve(self, task: str, kind: str) -> dict[str, Any]:
        if self.stopped:
            raise RequestError(503, "the server is shutting down")
        spec = self._tasks.get(task)
        if spec is None:
            raise RequestError(404, f"unknown task '{task}'; served tasks: {', '.join(sorted(self._tasks))}")
        if spec["kind"] != kind:
            verb = "/v1/classify" if spec["kind"] == "classification" else "/v1/completions"
            raise RequestError(400, f"task '{task}' is a {spec['kind']} task; use {verb}")
        return spec

    async def classify(self, task: str, texts: list[str]) -> list[Classification]:
        self._fail()
        self._resolve(task, "classification")
        if not texts or any(not isinstance(t, str) for t in texts):
            raise RequestError(400, "input must be a string or a non-empty list of strings")
        self._enter()
        try:
            while self.held.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(self.delay)
            self.stats.record("classify", len(texts))
            out = []
            for text in texts:
                words = text.lower().split()
                score = sum(w in POSITIVE for w in words[:MAX_LENGTH]) - sum(
                    w in NEGATIVE for w in words[:MAX_LENGTH]
                )
                pos = 0.9 if score > 0 else 0.1 if score < 0 else 0.5
                out.append(Classification({"neg": 1 - pos, "pos": pos}, truncated=len(words) > MAX_LENGTH))
            return out
        finally:
            self._leave()

    def chat_prompt(self, task: str, messages: list[dict[str, Any]]) -> str:
        if not messages or any(not isinstance(m.get("content"), str) for m in messages):
            raise RequestError(400, "messages must be a non-empty list of {role, content} objects")
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            raise RequestError(400, "messages holds no message with role 'user'")
        return users[-1]

    def submit_generate(self, task: str, prompt: str, params: SamplingParams) -> FakeHandle:
        self._fail()
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, "prompt must be a non-empty string")
        params.validate()
        spec = self._resolve(task, "generation")
        words = len(prompt.split())
        if words + params.max_tokens > CONTEXT:
            raise RequestError(
                400,
                f"prompt has {words} tokens and max_tokens is {params.max_tokens}; the model's "
                f"context is {CONTEXT}: shorten the prompt or lower max_tokens",
            )
        self._enter()
        handle = FakeHandle(self, task, prompt, params, spec["version"])
        self.handles.append(handle)
        return handle

    async def load(self, name: str, folder: str) -> dict[str, Any]:
        if name in self._tasks:
            raise RequestError(409, f"task '{name}' is already served; use reload to replace it")
        if not Path(folder).is_dir():
            raise RequestError(400, f"{folder} is not an adapter folder")
        self._tasks[name] = {"kind": "generation", "method": "lora", "labels": [], "version": 1}
        self.sources[name] = folder
        return self.tasks()[name]

    async def unload(self, name: str) -> None:
        if name not in self._tasks:
            raise RequestError(404, f"unknown task '{name}'; served tasks: {', '.join(sorted(self._tasks))}")
        del self._tasks[name]

    async def reload(self, name: str, folder: str | None = None) -> dict[str, Any]:
        if name not in self._tasks:
            raise RequestError(404, f"unknown task '{name}'; load it first")
        if folder is not None and not Path(folder).is_dir():
            raise RequestError(400, f"{folder} is not an adapter folder")
        with contextlib.suppress(KeyError):
            folder = folder or self.sources[name]
        self.sources[name] = folder or ""
        # a new dict: handles admitted before keep the version they read
        self._tasks[name] = dict(self._tasks[name], version=self._tasks[name]["version"] + 1)
        return self.tasks()[name]


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None
