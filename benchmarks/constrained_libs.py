"""Which constrained-decoding library the server uses: each one's cost per generated token on SmolLM2's vocabulary.

    pip install xgrammar llguidance outlines-core      # the three candidates (multitune needs only one)
    python benchmarks/constrained_libs.py [--model smollm2-135m] [--rounds 5]

For each library and each of two formats, the same valid JSON answer (tokenized by the model's tokenizer) is
replayed through the library's matcher as a decoding server would: before each token the allowed-token mask
of the whole vocabulary is computed (a bitmask, the form each library fills for a logits processor), the token
is checked against it, and the matcher advances by it. Printed per library: the grammar's compile time (cold:
a fresh compiler per round, tokenizer set-up excluded and printed apart), and the median over rounds of the
mean milliseconds per token (mask + advance), which is what a constrained row adds to each decode step.

Formats: ``json_object`` (any JSON object: OpenAI's ``{"type": "json_object"}``) and ``schema`` (an object of a
string, an integer, an enum and an array of strings, all required). outlines-core builds a regex from a schema
and so cannot express ``json_object`` (JSON nests without limit, a regex does not): it is measured on the
schema only. Run it alone: the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "sentiment", "tags"],
    "additionalProperties": False,
}
ANSWERS = {
    "json_object": {
        "review": "A warm, funny film.",
        "score": 4,
        "cast": [{"role": "lead", "actor": "Ann Lee"}],
        "recommended": True,
        "notes": None,
    },  # fmt: skip
    "schema": {
        "name": "Ada Lovelace",
        "age": 36,
        "sentiment": "positive",
        "tags": ["math", "poetry", "engines"],
    },
}


def replay(step: Callable[[int], bool], tokens: list[int]) -> float:
    """Seconds per token of ``step`` (mask, check, advance) over ``tokens``."""
    tick = time.perf_counter()
    for token in tokens:
        if not step(token):
            raise SystemExit(f"the library refused token {token} of a valid answer")
    return (time.perf_counter() - tick) / len(tokens)


def xgrammar_case(tokenizer: Any, vocab: int, fmt: str) -> tuple[float, Callable[[int], bool]]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    tick = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compiled = (
        compiler.compile_builtin_json_grammar()
        if fmt == "json_object"
        else compiler.compile_json_schema(SCHEMA)
    )
    compile_s = time.perf_counter() - tick
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)

    def step(token: int) -> bool:
        matcher.fill_next_token_bitmask(mask)
        allowed = bool((mask[0, token // 32] >> (token % 32)) & 1)
        return allowed and matcher.accept_token(token)

    return compile_s, step


def llguidance_case(tokenizer: Any, vocab: int, fmt: str) -> tuple[float, Callable[[int], bool]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    tick = time.perf_counter()
    schema = {"type": "object"} if fmt == "json_object" else SCHEMA
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - tick
    if matcher.is_error():
        raise SystemExit(f"llguidance: {matcher.get_error()}")
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def step(token: int) -> bool:
        llguidance.torch.fill_next_token_bitmask(matcher, mask)
        allowed = bool((mask[0, token // 32] >> (token % 32)) & 1)
        return allowed and matcher.consume_token(token)

    return compile_s, step


def outlines_case(tokenizer: Any, vocab: int, fmt: str) -> tuple[float, Callable[[int], bool]] | None:
    if fmt == "json_object":
        return None
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    eos = tokenizer.eos_token_id
    strings: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id == eos:
            continue
        text = tokenizer.decode([token_id])
        strings.setdefault(text, []).append(token_id)
    vocabulary = Vocabulary(eos, strings)
    tick = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    compile_s = time.perf_counter() - tick
    guide = Guide(index)
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def step(token: int) -> bool:
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        allowed = bool((mask[token // 32] >> (token % 32)) & 1)
        if allowed:
            guide.advance(token)
        return allowed

    return compile_s, step


CASES = {"xgrammar": xgrammar_case, "llguidance": llguidance_case, "outlines-core": outlines_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from multitune.models import load_base

    base = load_base(args.model, device="cpu")
    tokenizer = base.tokenizer
    vocab = int(base.model.get_output_embeddings().weight.shape[0])
    print(f"{args.model}: vocabulary {vocab:,} (tokenizer {len(tokenizer):,})")
    print("| library | format | tokens | compile (ms, cold) | mask + advance per token (ms) |")
    print("|---|---|---|---|---|")
    for name, case in CASES.items():
        for fmt, answer in ANSWERS.items():
            tokens = tokenizer.encode(json.dumps(answer), add_special_tokens=False)
            compiles, per_token = [], []
            for _ in range(args.rounds):
                made = case(tokenizer, vocab, fmt)
                if made is None:
                    break
                compile_s, step = made
                compiles.append(compile_s)
                per_token.append(replay(step, tokens))
            if not per_token:
                print(f"| {name} | {fmt} | - | cannot express it | - |")
                continue
            print(f"| {name} | {fmt} | {len(tokens)} | {statistics.median(compiles) * 1e3:.1f} | "
                  f"{statistics.median(per_token) * 1e3:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
