"""Generation requests and the rows of one bank decoding together: what the scheduler batches.

A request is checked when it is made (:class:`SamplingParams`, :func:`check_text`) and followed through a
:class:`Handle` (its text pieces, its result, its cancellation). :class:`DecodeBatch` holds the running rows of
one bank (the shared base, or a fully fine-tuned copy) and their one KV cache: a joining group is prefilled
together and left-padded (or the running batch is) to the longer length, positions are counted over each row's
unmasked slots as :meth:`MultiTaskModel.run` and ``generate`` do, so a row's tokens equal generating it alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from multitune.errors import MultituneError
from multitune.models import supports_logits_to_keep

MIN_TEMPERATURE = (
    0.01  # below it logits / temperature overflows float32 (1e-300 gave inf, then NaN probabilities)
)
MAX_TEMPERATURE = 2.0
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)

log = logging.getLogger("multitune.serve.scheduler")  # the scheduler answers with these: its log


class RequestError(MultituneError):
    """A request the server answers with a 4xx/5xx status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class QueueFull(RequestError):
    def __init__(self, size: int) -> None:
        super().__init__(429, f"the server's queue is full ({size} requests waiting); retry shortly")


def check_text(text: Any, field: str) -> None:
    """Refuse a text the tokenizer cannot read, naming ``field``: JSON may carry a lone surrogate ("\\udc80"),
    which is valid JSON but no character, and fast tokenizers raise TypeError on it in the middle of a batch."""
    if not isinstance(text, str):
        raise RequestError(400, f"{field} must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(
            400,
            f"{field} holds a lone surrogate (U+{ord(text[error.start]):04X}) at character "
            f"{error.start}; send valid Unicode text",
        ) from None


@dataclass
class SamplingParams:
    """How a generation request samples.

    ``temperature`` 0 is greedy; otherwise it lies in [0.01, 2] (a smaller one overflows the division of the
    logits and is refused rather than silently changed). ``seed`` (0 <= seed < 2**64) makes sampling repeat;
    without it every request draws from its own clock-seeded stream.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = (
        None  # None: none; k: each token's log-probability and its k most likely alternatives
    )
    # the answer's format (serve.constrained.ResponseFormat; None: free text) and its compiled grammar
    response_format: Any = None
    grammar: Any = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError(400, f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(
                400, f"temperature must be between 0 and {MAX_TEMPERATURE:g} (got {self.temperature!r})"
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise RequestError(
                400,
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (got "
                f"{self.temperature!r}): a smaller one overflows; send 0 for greedy decoding",
            )
        if not 0 < self.top_p <= 1:
            raise RequestError(400, f"top_p must be in (0, 1] (got {self.top_p!r})")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise RequestError(400, "stop must be up to 4 non-empty strings")
        for i, stop in enumerate(self.stop):
            check_text(stop, f"stop.{i}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise RequestError(400, f"seed must be an integer with 0 <= seed < 2**64 (got {self.seed!r})")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise RequestError(
                400,
                f"logprobs asks for {self.logprobs!r} alternatives per token; this server gives 0 to {MAX_LOGPROBS}",
            )


LogProb = tuple[int, float, list[tuple[int, float]]]
_DONE = object()
NUCLEUS_CANDIDATES = 256  # the most probable tokens a top_p nucleus is looked for in first (draw_rows)
DETOKENISE_WINDOW = 4  # tokens before the new ones that each incremental decode includes (Handle._new_text)


class Handle:
    """One generation request: its text pieces as they come, its result, and a way to cancel it."""

    def __init__(
        self,
        task: str,
        internal: str,
        prompt_ids: list[int],
        params: SamplingParams,
        deadline: float,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.task, self.internal, self.prompt_ids, self.params = task, internal, prompt_ids, params
        self.prompt = ""
        self.deadline = deadline
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.error: RequestError | None = None
        self.cancelled = False
        self.generator: torch.Generator | None = None  # its own sampling stream (seeded when asked)
        self.grammar: Any = None  # its place in params.grammar (a matcher, made at its first token)
        self.logprob_sum, self.logprob_count = 0.0, 0  # of its sampled tokens, for the drift monitor
        # with params.logprobs: per generated token (token, log-probability, [(alternative, log-probability)])
        self.logprobs: list[LogProb] = []
        self._pieces: queue.Queue = queue.Queue()
        self._loop = loop
        self._apieces: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self._decoded = ""  # the generated tokens' text up to ``_read`` (before any stop cut)
        self._ready = ""  # the answer's text so far (cut at a stop); ``text`` is the part streamed
        self._prefix = self._read = 0  # token offsets of the detokenising window (see ``_new_text``)

    # ---- worker side -------------------------------------------------------------------------------
    def emit(self, piece: Any) -> None:
        """Send a text piece (or the end) to the client, with how many logprob entries the text so far
        covers (a stream with logprobs sends each piece's tokens with it)."""
        item = (piece, len(self.logprobs))
        self._pieces.put(item)
        if self._loop is not None and self._apieces is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
                self._loop.call_soon_threadsafe(self._apieces.put_nowait, item)

    def finish(self, reason: str, error: RequestError | None = None) -> None:
        if self._done.is_set():
            return
        self._emit_upto(len(self._ready))  # what was held back in case it began a stop string
        self.finish_reason, self.error = reason, error
        self._done.set()
        self.emit(_DONE)

    def append(
        self,
        token: int,
        generated: list[int],
        tokenizer: Any,
        eos: set[int],
        now: float,
        timeout_s: float,
        logprob: LogProb | None = None,
    ) -> None:
        """One new token of one row: its text piece out, and the row finished when it is done."""
        if self.cancelled:
            self.finish("cancelled")
            return
        if token in eos:
            self.finish("stop")
            return
        if self.grammar is not None and not self.grammar.accept_token(token):
            self.finish(
                "error",
                RequestError(500, f"token {token} is not allowed by the response_format; retry or report it"),
            )
            return
        generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        self.completion_tokens = len(generated)
        new = self._new_text(generated, tokenizer)
        full = self._decoded + new
        stops = self.params.stop
        # only text that contains the new piece can hold a stop the earlier steps did not find
        start = max(0, len(self._decoded) - max((len(s) for s in stops), default=1) + 1)
        found = first_stop(full[start:], stops)
        stop = None if found is None else start + found
        complete = not new.endswith("\ufffd")  # a split multi-byte character waits for its next bytes
        if complete or stop is not None:
            self._ready = full if stop is None else full[:stop]
            # the last characters could be the start of a stop string: held back until it is clear they are
            # not (vLLM does the same), so that no streamed piece is ever taken back
            hold = max((len(s) for s in stops), default=1) - 1
            self._emit_upto(len(self._ready) - hold)
        if complete:
            self._decoded = full
            self._prefix, self._read = self._read, len(generated)
        if stop is not None:
            self.finish("stop")
        elif len(generated) >= self.params.max_tokens:
            self.finish("length")
        elif now > self.deadline:
            self.finish(
                "timeout",
                RequestError(
                    504,
                    f"the request took longer than {timeout_s:g} s; "
                    "ask for fewer tokens or raise the server's --timeout",
                ),
            )

    def _emit_upto(self, end: int) -> None:
        """Stream the ready text up to ``end`` beyond what was already streamed."""
        piece = self._ready[len(self.text) : max(end, len(self.text))]
        if piece:
            self.text += piece
            self.emit(piece)

    def _new_text(self, generated: list[int], tokenizer: Any) -> str:
        """The text the tokens after ``_read`` add, decoding a window of a few tokens rather than everything
        generated so far (vLLM's incremental detokenisation): the window's decode less the decode of its old
        part. Both decodes start at the same token, so what a tokenizer does at the start of a text
        (SentencePiece drops a leading space, a word-level decoder joins words with spaces) cancels out, and
        the piece equals what the full decode adds. The window reaches back at least ``DETOKENISE_WINDOW``
        tokens, and further while its old part decodes to nothing (special tokens skipped), so a tokenizer's
        joining of a word to the one before is in it. Text a later token would change (a combining accent
        after its letter) stays as it was streamed, as with any streaming server."""
        start = max(0, min(self._prefix, self._read - DETOKENISE_WINDOW))
        while True:
            before = tokenizer.decode(generated[start : self._read], skip_special_tokens=True)
            if before or not start:
                break
            start = max(0, start - DETOKENISE_WINDOW)
        return tokenizer.decode(generated[start:], skip_special_tokens=True)[len(before) :]

    # ---- client side -------------------------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: the row leaves the batch at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def tokens(self) -> Iterator[str]:
        while True:
            piece, _ = self._pieces.get()
            if piece is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield piece

    async def stream(self) -> AsyncIterator[str]:
        async for piece, _ in self.stream_counted():
            if piece:
                yield piece

    async def stream_counted(self) -> AsyncIterator[tuple[str, int]]:
        """(piece, logprob entries covered so far) as they come; the last item is ("", all the entries)."""
        assert self._apieces is not None, "stream() needs the handle to be submitted from an event loop"
        while True:
            piece, count = await self._apieces.get()
            if piece is _DONE:
                if self.error is not None:
                    raise self.error
                yield "", count
                return
            yield piece, count

    async def result(self) -> tuple[str, str]:
        """(text, finish_reason) once done; right away when the pieces were already read (stream())."""
        if self._done.is_set():
            pass
        elif self._apieces is not None:
            async for _ in self.stream():
                pass
        else:
            await asyncio.to_thread(self._done.wait)
        if self.error is not None:
            raise self.error
        return self.text, self.finish_reason or "stop"


# ---- continuous batching over one bank -------------------------------------------------------------------
class DecodeBatch:
    """The generation rows of one bank (the shared base or a fully fine-tuned copy) and their KV cache."""

    def __init__(self, bank: Any) -> None:
        self.bank = bank
        self.rows: list[Handle] = []
        self.generated: list[list[int]] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, T) over the cache's positions
        self.last: torch.Tensor | None = None  # (B,) the token each row feeds next
        self._task_ids: torch.Tensor | None = None
        self._routing_version = -1

    def __len__(self) -> int:
        return len(self.rows)

    def task_ids(self) -> torch.Tensor:
        """Slot of each row, recomputed when the bank's tasks change (a removal shifts the slots)."""
        version = self.bank.routing.version
        if (
            self._task_ids is None
            or self._routing_version != version
            or len(self._task_ids) != len(self.rows)
        ):
            slots = self.bank.slots
            self._task_ids = torch.tensor(
                [slots.index(h.internal) for h in self.rows], dtype=torch.long, device=self.bank.base.device
            )
            self._routing_version = version
        return self._task_ids

    @torch.no_grad()
    def join(
        self,
        handles: list[Handle],
        sample: Callable[[torch.Tensor, list[Handle], list[list[int]]], list[int]],
    ) -> list[int]:
        """Prefill ``handles`` together and merge them into the running batch; returns their first tokens.

        Rows of one prompt on one task (OpenAI's n samples) are prefilled once: the forward runs each distinct
        (task, prompt) and its cache rows are repeated for every handle that asked for it."""
        bank = self.bank
        device = bank.base.device
        keys = [(h.internal, tuple(h.prompt_ids)) for h in handles]
        unique = list(dict.fromkeys(keys))
        distinct = [handles[keys.index(key)] for key in unique]
        width = max(len(h.prompt_ids) for h in distinct)
        pad = bank.base.tokenizer.pad_token_id
        ids = torch.full((len(distinct), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(distinct), width), dtype=torch.long, device=device)
        for i, h in enumerate(distinct):  # left padding, as generate expects
            ids[i, width - len(h.prompt_ids) :] = torch.tensor(h.prompt_ids, device=device)
            mask[i, width - len(h.prompt_ids) :] = 1
        slots = bank.slots
        task_ids = torch.tensor([slots.index(h.internal) for h in distinct], dtype=torch.long, device=device)
        # the LM head on the last position only, as generate does
        keep = {"logits_to_keep": 1} if supports_logits_to_keep(bank.base.model) else {}
        routed = bank.run(ids, mask, task_ids, use_cache=True, **keep)
        rows = [unique.index(k) for k in keys]
        return self._attach(
            routed.out.cache, routed.attention_mask, routed.out.logits[:, -1].float(), rows, handles, sample
        )

    def attach(
        self,
        prefill: Prefill,
        sample: Callable[[torch.Tensor, list[Handle], list[list[int]]], list[int]],
    ) -> list[int]:
        """A finished :class:`Prefill`'s rows join the running batch; returns their first tokens."""
        assert prefill.finished and prefill.logits is not None and prefill.mask is not None
        handles = prefill.handles
        return self._attach(prefill.cache, prefill.mask, prefill.logits, [0] * len(handles), handles, sample)

    def _attach(
        self,
        cache: Any,
        full: torch.Tensor,
        logits: torch.Tensor,
        rows: list[int],
        handles: list[Handle],
        sample: Callable[[torch.Tensor, list[Handle], list[list[int]]], list[int]],
    ) -> list[int]:
        """Prefilled rows (cache, mask, last logits) join the batch: handle ``i`` takes row ``rows[i]``."""
        device = full.device
        if rows != list(range(len(rows))):
            index = torch.tensor(rows, device=device)
            # repeated indices: each handle its own copy of its prompt's rows
            cache.batch_select_indices(index)
            full, logits = full.index_select(0, index), logits.index_select(0, index)
        first = sample(logits, handles, [[] for _ in handles])
        self._merge(cache, full, handles, torch.tensor(first, device=device))
        return first

    def _merge(
        self,
        cache: Any,
        mask: torch.Tensor,
        handles: list[Handle],
        last: torch.Tensor,
        generated: list[list[int]] | None = None,
    ) -> None:
        """Append rows (their cache, mask, next tokens, tokens so far) to the batch, left-padding the shorter.

        Every new tensor is built before any is assigned, so a failure leaves the batch as it was."""
        generated = [[] for _ in handles] if generated is None else generated
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.last = cache, mask, last
            self.rows, self.generated = list(handles), list(generated)
            self._task_ids = None
            return
        assert self.mask is not None and self.last is not None
        length = max(self.mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = [
            (
                torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)], dim=0),
                torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)], dim=0),
            )
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True)
        ]
        merged_mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)], dim=0)
        merged_last = torch.cat([self.last, last])
        for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
            layer.keys, layer.values = keys, values
        self.mask, self.last = merged_mask, merged_last
        self.rows += handles
        self.generated += generated
        self._task_ids = None

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step of every row: (B, vocab) logits of the next token.

        The mask and cache are the batch's only once the forward has returned; a forward that raises may
        have appended this step's positions to some layers of the cache, which :meth:`split` cuts off."""
        assert self.mask is not None and self.last is not None
        out, mask = continue_cache(self.bank, self.task_ids(), self.last[:, None], self.mask, self.cache)
        self.mask, self.cache = mask, out.cache
        return out.logits[:, -1].float()

    def split(self) -> list[DecodeBatch]:
        """One batch per row, sharing no state with this one: its rows of the cache, cut to the mask's length
        (what the cache held before a failed step). To run each row alone when a step of all of them failed."""
        assert self.mask is not None and self.last is not None
        length = self.mask.shape[1]
        parts = []
        for i in range(len(self.rows)):
            part = DecodeBatch(self.bank)
            part.cache = copy.copy(self.cache)
            part.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            for layer in part.cache.layers:
                layer.keys, layer.values = (
                    layer.keys[i : i + 1, :, :length],
                    layer.values[i : i + 1, :, :length],
                )
            part.mask, part.last = self.mask[i : i + 1], self.last[i : i + 1]
            part.rows, part.generated = [self.rows[i]], [self.generated[i]]
            parts.append(part)
        return parts

    def absorb(self, parts: list[DecodeBatch]) -> None:
        """This batch becomes the concatenation of ``parts`` (batches of its bank), in order."""
        self.keep([])
        for part in parts:
            assert part.mask is not None and part.last is not None
            self._merge(part.cache, part.mask, part.rows, part.last, part.generated)

    def keep(self, indices: list[int]) -> None:
        """Only the rows at ``indices`` stay; columns no remaining row attends to are cut from the left."""
        if not indices:
            self.rows, self.generated, self.cache, self.mask, self.last, self._task_ids = (
                [],
                [],
                None,
                None,
                None,
                None,
            )
            return
        if len(indices) == len(self.rows):
            return
        assert self.mask is not None and self.last is not None  # a batch with rows has both
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self.rows = [self.rows[i] for i in indices]
        self.generated = [self.generated[i] for i in indices]
        self._task_ids = None
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]


def continue_cache(
    bank: Any, task_ids: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, cache: Any, **kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """The routed forward of ``ids`` (B, n) after the positions ``cache`` holds (``mask`` (B, T) over them): a
    decode step (n = 1) or a later prefill chunk. Returns the output and the mask over the cache after it.

    Not ``bank.run``: that forward starts from text (each method's inputs hook adds prompts and prefixes); this one
    continues a cache where those positions already are. Positions count each row's unmasked slots before."""
    full = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1])], dim=1)
    positions = mask.sum(dim=1, keepdim=True)
    if ids.shape[1] > 1:
        positions = positions + torch.arange(ids.shape[1], device=ids.device)
    with bank.routed(task_ids):
        out = bank.base.model(
            input_ids=ids, attention_mask=full, position_ids=positions, cache=cache, use_cache=True, **kwargs
        )
    return out, full


# Prompt tokens prefilled per scheduler turn while other rows decode. benchmarks/chunked_prefill.py (SmolLM2, 8
# rows decoding, a 1024-token prompt, 2 CPU cores): their stall 2.3 s unchunked; 1.25 / 0.90 / 0.87 / 1.38 s with
# chunks of 64 / 128 / 256 / 512, the prompt's first token 7.5 / 4.3 / 3.8 / 3.4 s (2.2 s unchunked).
PREFILL_CHUNK = 256


class Prefill:
    """One prompt (and its n samples) prefilled a chunk per scheduler turn, beside the running rows' decode steps.

    Chunked prefill, as vLLM and Sarathi-Serve schedule it: without it a long prompt's prefill is one forward, and
    every row already decoding waits that whole forward for its next token. The first chunk is a forward from
    text (:meth:`MultiTaskModel.run`: the task's prompt or prefix positions go in then); each later one continues
    the cache as a decode step does, several positions at once. The cache is this object's own until
    :meth:`DecodeBatch.attach` merges it, so a chunk that fails touches no running row.
    """

    def __init__(self, bank: Any, handles: list[Handle], chunk: int) -> None:
        self.bank, self.handles, self.chunk = bank, handles, chunk
        self.ids = list(handles[0].prompt_ids)
        self.filled = 0  # prompt tokens in the cache
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (1, T) over the cache's positions
        self.logits: torch.Tensor | None = None  # (1, vocab) after the last chunk

    @property
    def finished(self) -> bool:
        return self.filled >= len(self.ids)

    @torch.no_grad()
    def advance(self) -> bool:
        """Prefill the next chunk; True once the whole prompt is in the cache (``logits`` then set)."""
        bank = self.bank
        device = bank.base.device
        piece = torch.tensor([self.ids[self.filled : self.filled + self.chunk]], device=device)
        task_ids = torch.tensor([bank.slots.index(self.handles[0].internal)], dtype=torch.long, device=device)
        keep = {"logits_to_keep": 1} if supports_logits_to_keep(bank.base.model) else {}
        if self.cache is None:
            routed = bank.run(piece, torch.ones_like(piece), task_ids, use_cache=True, **keep)
            cache, mask, logits = routed.out.cache, routed.attention_mask, routed.out.logits
        else:
            assert self.mask is not None
            out, mask = continue_cache(bank, task_ids, piece, self.mask, self.cache, **keep)
            cache, logits = out.cache, out.logits
        self.cache, self.mask = cache, mask
        self.filled += piece.shape[1]
        if self.finished:
            self.logits = logits[:, -1].float()
        return self.finished


def _generator(handle: Handle, device: torch.device) -> torch.Generator:
    """The row's own sampling stream (on the handle, not in a table keyed by id(): ids are reused), seeded with
    the request's seed or the clock."""
    if handle.generator is None:
        handle.generator = torch.Generator(device=device)
        p = handle.params
        handle.generator.manual_seed(p.seed if p.seed is not None else int(time.time_ns() % 2**63))
    return handle.generator


def draw_rows(logits: torch.Tensor, handles: list[Handle]) -> torch.Tensor:
    """One token per row (R, vocab) from softmax(logits / temperature) within each row's top_p nucleus, all rows at
    once: one softmax, the nucleus rows' top ``NUCLEUS_CANDIDATES`` probabilities (exact when they hold the
    row's top_p mass: no token beyond them is in its nucleus; a row whose nucleus is wider is sorted in full),
    one cumulative sum and search per group of rows. Each row's uniform draw comes from its own generator and
    which group it falls in depends on its own logits only, so a seeded request repeats whatever else shares
    its batch. A row whose probabilities are not a distribution (non-finite logits) gets -1."""
    device = logits.device
    temperature = torch.tensor([h.params.temperature for h in handles], device=device, dtype=logits.dtype)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    draws = torch.cat([torch.rand(1, generator=_generator(h, device), device=device) for h in handles])
    top_p = torch.tensor([h.params.top_p for h in handles], device=device, dtype=probs.dtype)
    tokens = torch.full((len(handles),), -1, dtype=torch.long, device=device)
    whole = top_p >= 1
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # rows, candidates, their ids
    if bool(whole.any()):
        groups.append((whole.nonzero(as_tuple=True)[0], probs[whole], None))
    if not bool(whole.all()):
        rows = (~whole).nonzero(as_tuple=True)[0]
        head, order = probs[rows].topk(min(NUCLEUS_CANDIDATES, probs.shape[1]), dim=-1)  # descending
        covered = head.sum(-1) >= top_p[rows]
        if bool(covered.any()):
            groups.append((rows[covered], head[covered], order[covered]))
        if not bool(covered.all()):
            wide = rows[~covered]
            groups.append((wide, *probs[wide].sort(dim=-1, descending=True)))
    for rows, head, ids in groups:
        if ids is not None:  # the nucleus: the smallest head whose mass reaches top_p
            head = torch.where(head.cumsum(-1) - head < top_p[rows, None], head, 0.0)
        cdf = head.cumsum(-1)
        target = (draws[rows] * cdf[:, -1]).unsqueeze(1).to(cdf.dtype)
        picked = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)
        tokens[rows] = (picked if ids is None else ids.gather(1, picked)).squeeze(1)
    total = probs.sum(-1)
    valid = torch.isfinite(total) & (total > 0) & ~torch.isnan(probs).any(dim=-1)
    return torch.where(valid, tokens, -1)


def eos_ids(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return {i for i in ids if i is not None}


def first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a request's future once; one its client has given up on (cancelled) is left alone."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def as_request_error(error: BaseException, what: str, logged: bool = False) -> RequestError:
    """What a request that failed with ``error`` is answered: its own status for a RequestError, 400 for any
    other user error, else a 500 (the traceback logged: it is a fault of ours or of the model's code)."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, MultituneError):
        return RequestError(400, str(error))
    if not logged:
        log.error("%s failed", what, exc_info=error)
    return RequestError(
        500,
        f"internal error in {what} ({type(error).__name__}: "
        f"{' '.join(str(error).split())[:300]}); the request was not completed, retry or report it",
    )


def logprob_entries(logits: torch.Tensor, tokens: list[int], handles: list[Handle]) -> list[LogProb | None]:
    """For each row whose request asked for logprobs: the emitted token's log-probability under the model's
    distribution (log-softmax of the raw logits, before temperature or top_p, as vLLM reports them) and the
    row's ``logprobs`` most likely tokens with theirs; None for the other rows. One log-softmax and one top-k
    over the rows that asked."""
    rows = [i for i, h in enumerate(handles) if h.params.logprobs is not None]
    out: list[LogProb | None] = [None] * len(handles)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in rows], device=logits.device)[:, None])[
        :, 0
    ].tolist()
    k = max(int(handles[i].params.logprobs or 0) for i in rows)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    values, ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = int(handles[i].params.logprobs or 0)
        out[i] = (tokens[i], chosen[j], list(zip(ids[j][:n], values[j][:n], strict=True)))
    return out


def sample_tokens(logits: torch.Tensor, handles: list[Handle]) -> list[int]:
    """Next token of each row: greedy at temperature 0, else temperature + nucleus sampling (own seed), the
    sampled rows drawn together (:func:`draw_rows`).

    A row with a response_format chooses among the tokens its grammar allows (serve.constrained.mask_rows).
    A row whose sampling fails is answered with its error (its token is then never used)."""
    if any(h.params.grammar is not None for h in handles):
        from multitune.serve.constrained import mask_rows  # it imports this module

        logits = mask_rows(logits, handles)
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, h in enumerate(handles) if h.params.temperature > 0 and not h.done]
    if not rows:
        return tokens
    sampled = handles if len(rows) == len(handles) else [handles[i] for i in rows]
    picked = logits if len(rows) == len(handles) else logits[torch.tensor(rows, device=logits.device)]
    try:
        drawn = draw_rows(picked, sampled).tolist()
    except Exception as error:  # noqa: BLE001  (the sampled rows fail; greedy rows go on)
        for handle in sampled:
            handle.finish("error", as_request_error(error, "sampling"))
        return tokens
    for i, handle, token in zip(rows, sampled, drawn, strict=True):
        if token < 0:
            handle.finish(
                "error",
                RequestError(
                    500, "sampling failed: the model's logits for this row are not finite; retry or report it"
                ),
            )
        else:
            tokens[i] = token
    return tokens
