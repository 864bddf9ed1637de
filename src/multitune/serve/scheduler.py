"""The serving scheduler: requests of many tasks and methods batched into shared forwards.

One worker thread owns the engine (the model is never touched from two threads). Each turn of its loop:

1. admin operations (load / unload / reload a task) run between forwards, so none lands mid-batch;
2. waiting classification requests, up to ``max_batch_size`` rows of any tasks, go through one
   :meth:`Engine.classify` (one forward per model);
3. generation is **continuously batched**: waiting requests join the running batch after one prefill
   (their soft prompts and prefix caches applied), then every active row advances one token per decode
   step, whatever its task and method; a row leaves as soon as it is done (stop token, stop string,
   ``max_tokens``, timeout or cancellation) and its place is free for the next step. While rows are decoding,
   a prompt longer than ``prefill_chunk`` tokens is prefilled a chunk per turn between their steps
   (:class:`multitune.serve.decode.Prefill`), so that it never holds up their next token for its whole prefill.

Rows of a decoder batch keep one KV cache (:class:`multitune.serve.decode.DecodeBatch`), so a row's tokens equal
generating it alone. Encoder-decoder (T5) generation is served in static batches through
:meth:`Engine.generate`, one per distinct ``max_tokens``.

Reload is atomic (:mod:`multitune.serve.names`): rows already admitted finish on the old version.

Every task is watched for drift (:mod:`multitune.serve.watch`: one reference profile per task from its adapter
folder, kept in step with load, unload and reload): each classification row's pooled vector, token length and
unknown-token rate come from the forward that served it, each finished generation's length and mean token
log-probability from the logits its decode steps computed anyway; rows are observed after their answers are
settled, on the worker thread. ``monitor=False`` builds no monitor and computes nothing for it.

One bad request never takes its batch with it. Requests are checked before they are queued (texts a tokenizer
can read, seeds and temperatures the sampler can use); when a forward still fails, its requests are run one by
one so that only the guilty one fails (a 400 for a :class:`~multitune.errors.MultituneError`, else a 500, logged
with its traceback), and every request taken from a queue is answered, whatever happens.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from multitune.health.live import Monitor
from multitune.serve.decode import (
    PREFILL_CHUNK,
    SEED_LIMIT,
    DecodeBatch,
    Handle,
    LogProb,
    Prefill,
    QueueFull,
    RequestError,
    SamplingParams,
    as_request_error,
    check_text,
    eos_ids,
    first_stop,
    logprob_entries,
    sample_tokens,
    settle,
)
from multitune.serve.engine import Classification, in_passing_thread
from multitune.serve.names import TaskNames
from multitune.serve.observe import Stats
from multitune.serve.watch import Watch, token_logprobs

log = logging.getLogger("multitune.serve.scheduler")
T = TypeVar("T")


@dataclass
class _Classify:
    task: str  # the public name (what the monitor watches)
    internal: list[str | None]  # for embeddings of the bare base: None
    texts: list[str]
    future: concurrent.futures.Future
    enqueued: float
    embed: bool = (
        False  # /v1/embeddings: the rows' sentence embeddings, in the same batches as classification
    )


@dataclass
class _Admin:
    op: Callable[[], Any]
    future: concurrent.futures.Future


# ---- the scheduler ------------------------------------------------------------------------------------------
class Scheduler:
    """Requests in, mixed batches through the engine, answers out (see the module docstring).

    On CPU, load ``engine`` with :func:`in_passing_thread` (as ``multitune serve`` does): an engine loaded in a
    thread that goes on living leaves an OpenMP pool beside the worker's, and the worker's forwards run up to
    2x slower.
    """

    def __init__(
        self,
        engine: Any,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        timeout_s: float = 60.0,
        monitor: bool = True,
        monitor_options: dict[str, Any] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        self.engine = engine
        self.prefill_chunk = prefill_chunk  # 0: every prompt prefilled in one forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.stats = Stats()
        self._lock = threading.Lock()  # guards the queues, the name map and the tokenizer
        self._wake = threading.Condition(self._lock)
        self._classify: collections.deque[_Classify] = collections.deque()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._admin: collections.deque[_Admin] = collections.deque()
        self._decoders: dict[int, DecodeBatch] = {}
        self._static: list[Handle] = []  # seq2seq rows, served in static batches
        self._prefills: collections.deque[Prefill] = collections.deque()  # long prompts, a chunk per turn
        self.names = TaskNames(engine, self._lock)  # public name -> the version it runs on (atomic reload)
        self._thread: threading.Thread | None = None
        self._running = False
        self._taken: list[_Classify | Handle] = []  # taken from the queues this turn (see _fail_all)
        self.watch = Watch(engine, self.names, monitor, monitor_options)  # drift monitoring (serve/watch.py)
        # response_format compilers, one per tokenizer (kept with it: an id() alone could be reused)
        self._grammars: dict[int, tuple[Any, Any]] = {}
        self._grammars_lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="multitune-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        stopped = RequestError(503, "the server is shutting down; retry on another instance")
        with self._lock:
            classify, waiting, static = list(self._classify), list(self._waiting), list(self._static)
            self._classify.clear()
            self._waiting.clear()
            self._static.clear()
        for item in classify:
            settle(item.future, error=stopped)
        for handle in waiting + static:
            handle.finish("error", stopped)
        for batch in self._decoders.values():
            for handle in batch.rows:
                handle.finish("error", stopped)

    @property
    def monitor(self) -> Monitor | None:
        """The served tasks' drift monitor (what /v1/monitor reads); None when monitoring is off."""
        return self.watch.monitor

    # ---- tasks --------------------------------------------------------------------------------------
    def tasks(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return self.names.cards()

    # ---- classification -----------------------------------------------------------------------------
    async def classify(self, task: str, texts: list[str]) -> list[Classification]:
        """Each text's label probabilities (and whether it was cut to the task's max_length)."""
        return await self._queued_rows(task, texts, "classification", embed=False)

    async def embed(self, task: str | None, texts: list[str]) -> list[tuple[list[float], int]]:
        """Each text's normalised mean-pooled embedding through ``task``'s adapter (any kind of task), or of
        the bare base for None, with its token count; queued and batched with classification rows."""
        if self.engine.base.arch == "seq2seq":
            raise RequestError(
                400,
                "embeddings are served for encoder and decoder bases; this server's base is encoder-decoder",
            )
        return await self._queued_rows(task, texts, None, embed=True)

    async def _queued_rows(self, task: str | None, texts: list[str], kind: str | None, embed: bool) -> Any:
        """Check the texts, queue them as one item of the classification queue (``kind`` None: a task of any
        kind, or the bare base for task None) and wait for the worker's answer, 504 past the deadline."""
        if not texts or any(not isinstance(t, str) for t in texts):
            raise RequestError(400, "input must be a string or a non-empty list of strings")
        for i, text in enumerate(texts):
            check_text(text, f"input.{i}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            internal = None if task is None else self.names.resolve(task, kind)
            self._check_room()
            rows: list[str | None] = [internal] * len(texts)
            self._classify.append(_Classify(task or "", rows, list(texts), future, time.monotonic(), embed))
            self._wake.notify()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError as error:
            future.cancel()
            raise RequestError(
                504,
                f"the request took longer than {self.timeout_s:g} s; retry or raise the server's --timeout",
            ) from error

    def _check_room(self) -> None:
        depth = len(self._classify) + len(self._waiting)
        if depth >= self.queue_size:
            raise QueueFull(depth)

    # ---- generation ---------------------------------------------------------------------------------
    def chat_prompt(self, task: str, messages: list[dict[str, Any]]) -> str:
        """A chat conversation as the task's prompt text: the last user message alone (as the task was
        trained on single prompts), or the whole conversation through the tokenizer's chat template."""
        if not messages or any(
            not isinstance(m, dict) or not isinstance(m.get("content"), str) for m in messages
        ):
            raise RequestError(400, "messages must be a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            check_text(message["content"], f"messages.{i}.content")
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise RequestError(400, "messages holds no message with role 'user'")
        if (
            len(messages) == 1
            or all(m.get("role") in ("system", "user") for m in messages)
            and len(users) == 1
        ):
            return users[-1]["content"]
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages)

    def compile_format(self, task: str, params: SamplingParams) -> None:
        """Compile ``params.response_format`` for the task's tokenizer into ``params.grammar`` (a 400 when
        the library cannot, a 501 when it is not installed). :meth:`submit_many` does it when it was not done;
        the HTTP API does it first on a thread, so that a large schema never holds up the event loop."""
        if params.response_format is None or params.grammar is not None:
            return
        from multitune.serve.constrained import Grammars

        with self._lock:
            internal = self.names.resolve(task, "generation")
            bank = self.engine.bank_of(internal)
        if bank.base.arch == "seq2seq":
            raise RequestError(
                400, "response_format is served for decoder models; this task's base is encoder-decoder"
            )
        tokenizer = bank.base.tokenizer
        with self._grammars_lock:
            held = self._grammars.get(id(tokenizer))
            if held is None or held[0] is not tokenizer:
                vocab = int(bank.base.model.get_output_embeddings().weight.shape[0])
                with self.engine.tokenizer_lock:
                    held = self._grammars[id(tokenizer)] = (
                        tokenizer,
                        Grammars(tokenizer, vocab, eos_ids(tokenizer)),
                    )
        params.grammar = held[1].compile(params.response_format)

    def submit_generate(self, task: str, prompt: str, params: SamplingParams) -> Handle:
        return self.submit_many(task, prompt, params, 1)[0]

    def submit_many(self, task: str, prompt: str, params: SamplingParams, n: int) -> list[Handle]:
        """``n`` samples of one prompt (OpenAI's ``n``): rows of the same batch, admitted together so that they
        share one prefill (:meth:`DecodeBatch.join` runs a prompt once for all its rows). With a seed, sample
        ``i`` draws from seed + i, so the n answers differ from each other and repeat from request to request."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RequestError(400, f"n must be an integer >= 1 (got {n!r})")
        if n > self.max_batch_size:
            raise RequestError(
                400,
                f"n is {n}, but this server decodes at most {self.max_batch_size} rows together (its "
                "--max-batch-size); ask for fewer samples per request",
            )
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string")
        check_text(prompt, "prompt")
        params.validate()
        self.compile_format(task, params)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            internal = self.names.resolve(task, "generation")
            self._check_room()
            bank = self.engine.bank_of(internal)
        ids = self._prompt_ids(bank, internal, prompt)
        context = self._context(bank)
        virtual = self._virtual_tokens(bank, internal)
        if context and len(ids) + virtual + params.max_tokens > context:
            raise RequestError(
                400,
                f"prompt has {len(ids)} tokens (+{virtual} virtual) and max_tokens is "
                f"{params.max_tokens}; the model's context is {context}: shorten the "
                "prompt or lower max_tokens",
            )
        if bank.base.arch == "seq2seq":
            self._check_static(params)
        deadline = time.monotonic() + self.timeout_s
        handles = []
        for i in range(n):
            own = (
                params
                if params.seed is None or not i
                else dataclasses.replace(params, seed=(params.seed + i) % SEED_LIMIT)
            )
            handle = Handle(task, internal, ids, own, deadline, loop)
            handle.prompt = prompt
            handles.append(handle)
        with self._wake:
            self._check_room()
            self._waiting.extend(handles)
            self._wake.notify()
        return handles

    @staticmethod
    def _check_static(params: SamplingParams) -> None:
        """An encoder-decoder task decodes greedily in static batches: what only step-wise decoding gives is
        refused, not silently dropped."""
        if params.logprobs is not None:
            raise RequestError(
                400, "logprobs are served for decoder models; this task's base is encoder-decoder"
            )
        if params.temperature > 0:
            raise RequestError(
                400,
                "temperature: sampling is served for decoder models; this task's base is encoder-decoder and "
                "decodes greedily: send temperature 0 (or leave it out)",
            )

    def token_logprobs(
        self, handle: Handle, start: int = 0, end: int | None = None
    ) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """A handle's logprob entries (``start:end`` of them) with their tokens as text (each token decoded
        alone, as OpenAI and vLLM report them)."""
        entries = handle.logprobs[start:end]
        if not entries:
            return []
        tokenizer = self.engine.bank_of(handle.internal).base.tokenizer
        out = []
        with self.engine.tokenizer_lock:
            for token, logprob, alternatives in entries:
                top = [(tokenizer.decode([t]), lp) for t, lp in alternatives]
                out.append((tokenizer.decode([token]), logprob, top))
        return out

    def generate_sync(self, task: str, prompt: str, params: SamplingParams) -> tuple[str, str]:
        handle = self.submit_generate(task, prompt, params)
        for _ in handle.tokens():
            pass
        return handle.text, handle.finish_reason or "stop"

    def _prompt_ids(self, bank: Any, internal: str, prompt: str) -> list[int]:
        """The prompt's token ids exactly as Engine.generate encodes them (the engine's tokenizer lock held)."""
        features, _ = self.engine.features(bank, [(internal, prompt)], [0], 10**6, False)
        return list(features[0]["input_ids"])

    @staticmethod
    def _context(bank: Any) -> int:
        config = bank.base.model.config
        return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0)

    @staticmethod
    def _virtual_tokens(bank: Any, internal: str) -> int:
        return bank.virtual_positions(internal)

    # ---- admin --------------------------------------------------------------------------------------
    async def _admin_call(self, op: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._admin.append(_Admin(op, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    async def load(self, name: str, folder: str) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            self.names.load(name, folder)
            self.watch.watch(name)
            return self.tasks()[name]

        return await self._admin_call(op)

    async def unload(self, name: str) -> None:
        def op() -> None:
            self.names.unload(name)
            self.watch.forget(name)
            self._collect_retired()  # now, or once no admitted row uses it

        return await self._admin_call(op)

    async def reload(self, name: str, folder: str | None = None) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            self.names.reload(name, folder)
            self.watch.watch(name)  # the new version's own reference: its adapter shapes the features
            self._collect_retired()
            return self.tasks()[name]

        return await self._admin_call(op)

    def _in_use(self) -> set[str]:
        used = {h.internal for h in self._waiting} | {h.internal for h in self._static}
        used |= {i for item in self._classify for i in item.internal if i is not None}
        for batch in self._decoders.values():
            used |= {h.internal for h in batch.rows}
        for prefill in self._prefills:
            used |= {h.internal for h in prefill.handles}
        return used

    def _collect_retired(self) -> None:
        with self._lock:
            used = self._in_use()
        self.names.collect(used)

    # ---- the worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                if not self._running:
                    return
                idle = not (
                    self._classify
                    or self._waiting
                    or self._admin
                    or self._static
                    or self._prefills
                    or any(len(b) for b in self._decoders.values())
                )
                if idle:
                    self._wake.wait(timeout=0.5)
                    continue
                admin = list(self._admin)
                self._admin.clear()
                self.stats.queue_depth = len(self._classify) + len(self._waiting)
            for item in admin:
                try:
                    item.future.set_result(item.op())
                except BaseException as error:  # noqa: BLE001  (the caller gets it)
                    item.future.set_exception(error)
            self._taken = []
            try:
                if not self._turn():
                    with self._wake:
                        self._wake.wait(timeout=self.max_wait / 4)
                if self.names.retired:
                    self._collect_retired()
            except Exception as error:  # noqa: BLE001  (a fault of the scheduler itself: never stop serving)
                log.exception("the scheduler's turn failed; answering every request it held with a 500")
                self._fail_all(as_request_error(error, "the scheduler's turn", logged=True))

    def _fail_all(self, error: RequestError) -> None:
        """The safety net: answer every request taken from a queue this turn and every running row."""
        for item in self._taken:
            if isinstance(item, _Classify):
                settle(item.future, error=error)
            else:
                item.finish("error", error)
        self._taken = []
        for batch in self._decoders.values():
            for handle in batch.rows:
                handle.finish("error", error)
            batch.keep([])
        while self._prefills:
            for handle in self._prefills.popleft().handles:
                handle.finish("error", error)

    def _isolated(
        self,
        items: list[T],
        run: Callable[[list[T]], None],
        fail: Callable[[T, RequestError], None],
        what: str,
    ) -> None:
        """``run(items)``; when it raises, ``run([item])`` for each item, so that only a guilty one fails.

        ``run`` must leave no trace when it raises (the batch is run again without the failing item)."""
        try:
            run(items)
            return
        except Exception as error:  # noqa: BLE001  (retried below; a lone item's error is its answer)
            if len(items) == 1:
                fail(items[0], as_request_error(error, what))
                return
            log.warning(
                "%s of %d requests failed (%s: %s); running them one by one",
                what,
                len(items),
                type(error).__name__,
                " ".join(str(error).split())[:200],
            )
        for item in items:
            try:
                run([item])
            except Exception as error:  # noqa: BLE001  (this request's answer)
                fail(item, as_request_error(error, what))

    def _turn(self) -> bool:
        """One turn of the worker; False when it found nothing ready (a batch is still filling)."""
        forwards = self.stats.forwards
        self._classify_batch()
        self._admit()
        self._decode_step()
        self._prefill_step()
        self._static_batch()
        return self.stats.forwards != forwards

    def _classify_batch(self) -> None:
        with self._lock:
            if not self._classify:
                return
            waited = time.monotonic() - self._classify[0].enqueued
            rows = sum(len(c.texts) for c in self._classify)
            busy = any(len(b) for b in self._decoders.values()) or self._waiting
            if rows < self.max_batch_size and waited < self.max_wait and not busy:
                return  # wait a moment for more rows to share the forward
            items: list[_Classify] = []
            total = 0
            while self._classify and (
                not items or total + len(self._classify[0].texts) <= self.max_batch_size
            ):
                item = self._classify.popleft()
                if item.future.cancelled():
                    continue
                items.append(item)
                total += len(item.texts)
            self._taken.extend(items)
        if not items:
            return

        def embed(batch: list[_Classify]) -> None:
            rows = [
                (internal, text)
                for item in batch
                for internal, text in zip(item.internal, item.texts, strict=True)
            ]
            vectors = self.engine.embed_rows(rows)
            self.stats.record("embed", len(rows))
            start = 0
            for item in batch:
                settle(item.future, vectors[start : start + len(item.texts)])
                start += len(item.texts)

        def run(batch: list[_Classify]) -> None:
            requests = [
                (str(internal), text)  # a classification row always names its task
                for item in batch
                for internal, text in zip(item.internal, item.texts, strict=True)
            ]
            results = self.engine.classify_rows(requests, features=self.monitor is not None)
            self.stats.record("classify", len(requests))
            groups, start = [], 0
            for item in batch:
                rows = results[start : start + len(item.texts)]
                settle(item.future, rows)
                groups.append((item.task, str(item.internal[0]), rows))
                start += len(item.texts)
            self.watch.classified(groups)  # after every answer is out; never raises

        embeds = [item for item in items if item.embed]
        if embeds:
            self._isolated(embeds, embed, lambda item, error: settle(item.future, error=error), "embedding")
        items = [item for item in items if not item.embed]
        if items:
            self._isolated(items, run, lambda item, error: settle(item.future, error=error), "classification")

    def _admit(self) -> None:
        """Waiting generation requests join their bank's running batch (one prefill per bank)."""
        with self._lock:
            if not self._waiting:
                return
            active = sum(len(b) for b in self._decoders.values()) + len(self._static)
            active += sum(len(p.handles) for p in self._prefills)
            if not active and len(self._waiting) < self.max_batch_size:
                first = self._waiting[0].deadline - self.timeout_s
                if time.monotonic() - first < self.max_wait:
                    return  # an idle server waits a moment so that a burst prefills together
            joining: dict[int, list[Handle]] = {}
            room = self.max_batch_size - active
            while self._waiting and room > 0:
                handle = self._waiting.popleft()
                self._taken.append(handle)
                if self._expired(handle, "in the queue"):
                    continue
                bank = self.engine.bank_of(handle.internal)
                if bank.base.arch == "seq2seq":
                    self._static.append(handle)
                else:
                    joining.setdefault(id(bank), []).append(handle)
                room -= 1
        decoding = bool(self._prefills) or any(len(b) for b in self._decoders.values())
        for handles in joining.values():
            bank = self.engine.bank_of(handles[0].internal)
            batch = self._batch_of(bank)
            bank.eval()
            if decoding and self.prefill_chunk:  # long prompts a chunk per turn, the rest in one prefill now
                handles = self._chunked(bank, handles)
                if not handles:
                    continue

            def run(group: list[Handle], batch: DecodeBatch = batch) -> None:
                start = len(batch)
                logprobs: list[float] = []
                entries: list[LogProb | None] = []
                first = batch.join(
                    group, self._sampler(logprobs, entries)
                )  # raises before it changes the batch
                self.stats.record("prefill", len(group))
                rows = list(range(start, start + len(group)))
                self._advance(batch, rows, first, logprobs or None, entries or None)

            self._isolated(handles, run, lambda handle, error: handle.finish("error", error), "prefill")

    def _batch_of(self, bank: Any) -> DecodeBatch:
        batch = self._decoders.setdefault(id(bank), DecodeBatch(bank))
        if batch.bank is not bank:  # a bank id reused after a removal
            batch = self._decoders[id(bank)] = DecodeBatch(bank)
        return batch

    def _chunked(self, bank: Any, handles: list[Handle]) -> list[Handle]:
        """Queue a :class:`Prefill` for each prompt longer than ``prefill_chunk`` tokens (its n samples
        together); returns the other handles."""
        long: dict[tuple[str, tuple[int, ...]], list[Handle]] = {}
        short = []
        for handle in handles:
            if len(handle.prompt_ids) > self.prefill_chunk:
                long.setdefault((handle.internal, tuple(handle.prompt_ids)), []).append(handle)
            else:
                short.append(handle)
        self._prefills.extend(Prefill(bank, group, self.prefill_chunk) for group in long.values())
        return short

    def _prefill_step(self) -> None:
        """One chunk of the oldest long prompt's prefill; when it was the last, its rows join their batch."""
        while self._prefills:
            prefill = self._prefills[0]
            prefill.handles = [h for h in prefill.handles if not self._expired(h, "before its prefill ended")]
            if not prefill.handles:
                self._prefills.popleft()
                continue
            try:
                finished = prefill.advance()
                self.stats.record("prefill_chunk", 1)
                if not finished:
                    return
                self._prefills.popleft()
                batch = self._batch_of(prefill.bank)
                start = len(batch)
                logprobs: list[float] = []
                entries: list[LogProb | None] = []
                first = batch.attach(prefill, self._sampler(logprobs, entries))  # raises before it changes it
            except Exception as error:  # noqa: BLE001  (its own cache: only this prompt's rows fail)
                if self._prefills and self._prefills[0] is prefill:
                    self._prefills.popleft()
                for handle in prefill.handles:
                    handle.finish("error", as_request_error(error, "prefill"))
                return
            self.stats.record("prefill", len(prefill.handles))
            rows = list(range(start, start + len(prefill.handles)))
            self._advance(batch, rows, first, logprobs or None, entries or None)
            return

    def _expired(self, handle: Handle, where: str) -> bool:
        """Finish a cancelled or timed-out request that has not started; True when it was."""
        if handle.cancelled:
            handle.finish("cancelled")
        elif time.monotonic() > handle.deadline:
            handle.finish(
                "timeout",
                RequestError(
                    504,
                    f"the request waited longer than {self.timeout_s:g} s "
                    f"{where}; retry or raise the server's --timeout",
                ),
            )
        return handle.done

    def _decode_step(self) -> None:
        for key, batch in list(self._decoders.items()):
            if not len(batch):
                del self._decoders[key]
                continue
            try:
                logits = batch.step()
            except Exception as error:  # noqa: BLE001  (each row alone: only a guilty one fails)
                alone = self._step_rows_alone(batch, error)
                if alone is None:
                    continue
                logits = alone
            self.stats.record("decode", len(batch))
            tokens = sample_tokens(logits, batch.rows)
            logprobs = token_logprobs(logits, tokens) if self.monitor is not None else None
            entries = logprob_entries(logits, tokens, batch.rows)
            self._advance(batch, list(range(len(batch))), tokens, logprobs, entries)

    def _step_rows_alone(self, batch: DecodeBatch, error: Exception) -> torch.Tensor | None:
        """After a failed decode step, the step of each row alone: a row that fails again is answered with
        its error, the others go on as one batch again. Returns their logits (None when no row is left)."""
        if len(batch) == 1:
            batch.rows[0].finish("error", as_request_error(error, "decode step"))
            batch.keep([])
            return None
        log.warning(
            "a decode step of %d rows failed (%s: %s); running each row alone",
            len(batch),
            type(error).__name__,
            " ".join(str(error).split())[:200],
        )
        kept, logits = [], []
        for part in batch.split():
            try:
                logits.append(part.step())
                kept.append(part)
            except Exception as alone:  # noqa: BLE001  (this row's answer)
                part.rows[0].finish("error", as_request_error(alone, "decode step"))
        batch.absorb(kept)
        return torch.cat(logits) if logits else None

    def _advance(
        self,
        batch: DecodeBatch,
        rows: list[int],
        tokens: list[int],
        logprobs: list[float] | None = None,
        entries: list[LogProb | None] | None = None,
    ) -> None:
        """Append each row's new token, emit its text, and let finished rows leave (observed when the monitor
        is on: ``logprobs`` are the tokens' log-probabilities; ``entries``, for the rows whose requests asked,
        what their answer reports)."""
        tokenizer = batch.bank.base.tokenizer
        eos = eos_ids(tokenizer)
        now = time.monotonic()
        finished: list[Handle] = []
        for k, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            handle, generated = batch.rows[row], batch.generated[row]
            if handle.done:
                continue
            if logprobs is not None:
                handle.logprob_sum += logprobs[k]
                handle.logprob_count += 1
            try:
                entry = entries[k] if entries is not None else None
                handle.append(token, generated, tokenizer, eos, now, self.timeout_s, entry)
            except Exception as error:  # noqa: BLE001  (this row fails; the batch goes on)
                handle.finish("error", as_request_error(error, "decoding a token"))
            if handle.done:
                finished.append(handle)
        if finished and logprobs is not None:
            self.watch.generated(finished)
        # every row still running has just appended its token: that token is what it feeds next
        batch.last = torch.tensor([g[-1] if g else 0 for g in batch.generated], device=batch.bank.base.device)
        batch.keep([i for i, h in enumerate(batch.rows) if not h.done])

    def _sampler(
        self, logprobs: list[float], entries: list[LogProb | None]
    ) -> Callable[[torch.Tensor, list[Handle], list[list[int]]], list[int]]:
        """decode.sample_tokens, also writing the sampled tokens' log-probabilities into ``logprobs`` when the
        monitor is on and the requests' logprob entries into ``entries`` (a prefill's logits live only inside
        :meth:`DecodeBatch.join`)."""

        def sample(logits: torch.Tensor, handles: list[Handle], generated: list[list[int]]) -> list[int]:
            tokens = sample_tokens(logits, handles)
            if self.monitor is not None:
                logprobs[:] = token_logprobs(logits, tokens)
            entries[:] = logprob_entries(logits, tokens, handles)
            return tokens

        return sample

    def _static_batch(self) -> None:
        """Encoder-decoder rows: one Engine.generate per distinct max_tokens (greedy)."""
        with self._lock:
            pending, self._static = self._static, []
        self._taken.extend(pending)
        groups: dict[int, list[Handle]] = {}
        for handle in pending:
            if not self._expired(handle, "in the queue"):
                groups.setdefault(handle.params.max_tokens, []).append(handle)
        for tokens, handles in groups.items():

            def run(group: list[Handle], tokens: int = tokens) -> None:
                texts = self.engine.generate(
                    [(h.internal, h.prompt) for h in group], max_new_tokens=tokens, max_length=10**6
                )
                self.stats.record("seq2seq", len(group))
                for handle, text in zip(group, texts, strict=True):
                    stop = first_stop(text, handle.params.stop)
                    handle.text = text[:stop] if stop is not None else text
                    handle.emit(handle.text)
                    handle.finish("stop")

            self._isolated(
                handles, run, lambda handle, error: handle.finish("error", error), "seq2seq generation"
            )


__all__ = ["Scheduler", "Stats", "in_passing_thread"]
