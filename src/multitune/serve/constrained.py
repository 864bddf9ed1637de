"""Constrained decoding: OpenAI's ``response_format`` as a grammar over the model's tokens, applied per row.

``{"type": "json_object"}`` makes the answer one JSON object; ``{"type": "json_schema", "json_schema":
{"schema": {...}}}`` one that validates against the schema. The request's format is compiled once when it is
made (:meth:`Grammars.compile`, a 400 with the library's message when it cannot be), each row then holds its
own matcher (:func:`mask_rows` forbids, before the row's token is chosen, every token the grammar does not
allow next; :meth:`Handle.append` advances the matcher by the chosen one), so constrained and free rows share
a batch and a step. Once the JSON is complete only the end of text is allowed: the row stops there.

The grammar library is xgrammar (Apache-2.0), picked by measured cost among the three kept ones
(``benchmarks/constrained_libs.py``, SmolLM2's 49,152 tokens, alone: the mask and advance of one token take
0.03-0.04 ms with xgrammar, 0.12-0.15 ms with llguidance, 0.41 ms with outlines-core, which builds a regex
and cannot express ``json_object``). In the server (``benchmarks/constrained_decoding.py``) the grammar's
work is 0.26 ms per constrained token, 1% of the wall time of 8 constrained rows of SmolLM2 on 2 CPU cores.
It is optional: ``pip install xgrammar`` (on Linux that also pulls triton, a GPU kernel
compiler of about 1 GB that CPU decoding never imports; ``pip install --no-deps xgrammar apache-tvm-ffi``
is enough beside multitune's own dependencies). Answers are compact JSON (``", "`` and ``": "`` between
items, no other whitespace): free whitespace lets a small model pad an answer with blank lines up to its
token limit.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from multitune.serve.decode import RequestError

if TYPE_CHECKING:
    from multitune.serve.decode import Handle

INSTALL = "pip install xgrammar"
MAX_KEPT = 256  # compiled formats kept per tokenizer (a few MB at most), the least recently used dropped
KINDS = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class ResponseFormat:
    """A checked ``response_format``: ``schema`` is the JSON schema's compact text (None: any JSON object)."""

    kind: str
    schema: str | None = None

    @property
    def grammar_source(self) -> str:
        return self.schema if self.schema is not None else '{"type": "object"}'


def parse_response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's ``response_format`` field as a ResponseFormat (None: free text), or a 400 naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError(
            400,
            'response_format must be an object with a "type": {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise RequestError(
            400, f"response_format.type is {kind!r}; this server takes one of {', '.join(KINDS)}"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(
            400,
            'response_format.json_schema is required with type json_schema: {"name": ..., "schema": {...}}',
        )
    schema = spec.get("schema")
    if schema is None:
        raise RequestError(400, "response_format.json_schema.schema is required: the JSON schema to follow")
    if not isinstance(schema, dict):
        raise RequestError(
            400,
            f"response_format.json_schema.schema must be a JSON schema object (got {type(schema).__name__})",
        )
    # not sorted: the order of "properties" is the order the answer writes them in
    return ResponseFormat("json_schema", json.dumps(schema, separators=(",", ":")))


def _library() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise RequestError(
            501,
            f"response_format needs the xgrammar package, not installed on this server; {INSTALL} "
            "and restart it (or leave out response_format)",
        ) from None
    return xgrammar


_LOCATION = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*")  # xgrammar's "[12:31:45] /path/file.cc:5088: " prefix


class Grammars:
    """The grammar compiler of one tokenizer, with the formats compiled so far (each once)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        xgr = _library()
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._compiled: collections.OrderedDict[ResponseFormat, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat) -> Any:
        with self._lock:
            if fmt in self._compiled:
                self._compiled.move_to_end(fmt)
                return self._compiled[fmt]
        try:
            compiled = self._compiler.compile_grammar(json_grammar(fmt.grammar_source))
        except Exception as error:  # noqa: BLE001  (the library says what in the schema it cannot follow)
            message = _LOCATION.sub("", " ".join(str(error).split()))[:300] or type(error).__name__
            raise RequestError(
                400, f"response_format.json_schema.schema cannot be compiled: {message}; fix the schema"
            ) from None
        with self._lock:
            compiled = self._compiled.setdefault(fmt, compiled)
            while len(self._compiled) > MAX_KEPT:  # the least recently asked for goes
                self._compiled.popitem(last=False)
            return compiled


# xgrammar writes a string with minLength/maxLength as a repetition of one character class that lets raw
# control characters in (invalid JSON: Python's json.loads refuses them; xgrammar#800, open), and both its
# classes of unescaped characters take the UTF-8 bytes of a surrogate (ED A0-BF xx: no character, which a
# decode turns into U+FFFD; random logits chose them in 4 of 200 answers). Both classes become one that
# leaves them out. A bounded string still has no escapes (as in xgrammar): putting them back as an
# alternative in the repetition made each mask take 11 ms instead of 0.01 (SmolLM2's vocabulary).
_BOUNDED_CHARACTER = r"[^\"\\\r\n]"
_FREE_CHARACTER = r"[^\0-\x1f\"\\\r\n]"
_UNESCAPED = r"[^\0-\x1f\"\\\uD800-\uDFFF]"


def json_grammar(schema: str) -> str:
    """The EBNF grammar of compact JSON following ``schema`` (xgrammar's, its string characters mended)."""
    grammar = str(_library().Grammar.from_json_schema(schema, any_whitespace=False))
    return grammar.replace(_BOUNDED_CHARACTER, _UNESCAPED).replace(_FREE_CHARACTER, _UNESCAPED)


def matcher(compiled: Any) -> Any:
    """A fresh matcher of a compiled format: one row's place in its grammar."""
    return _library().GrammarMatcher(compiled)


def mask_rows(logits: torch.Tensor, handles: list[Handle]) -> torch.Tensor:
    """``logits`` with every token a constrained row's grammar does not allow next set to -inf (a copy: the
    raw logits stay for the log-probabilities reported and observed); the same tensor when no row is
    constrained. A row's matcher is made at its first token."""
    rows = [i for i, h in enumerate(handles) if h.params.grammar is not None and not h.done]
    if not rows:
        return logits
    xgr = _library()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(handles), vocab)  # every row's bits set: a free row keeps all
    for i in rows:
        handle = handles[i]
        if handle.grammar is None:
            handle.grammar = matcher(handle.params.grammar)
        handle.grammar.fill_next_token_bitmask(bitmask, i)
    masked = logits.clone()
    # xgrammar's C++ kernel on CPU ("auto" took 5 times as long there); its CUDA one otherwise
    backend = "cpu" if masked.device.type == "cpu" else "auto"
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), indices=rows, backend=backend)
    return masked


__all__ = ["Grammars", "ResponseFormat", "mask_rows", "matcher", "parse_response_format"]
