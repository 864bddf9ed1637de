"""What response_format costs the server: the grammar's share of decoding, measured in the scheduler itself.

    python benchmarks/constrained_decoding.py [--rows 8] [--rounds 3] [--max-tokens 64]

SmolLM2-135M behind the real scheduler (no HTTP), ``--rows`` chat requests at once ("The film X as JSON:",
greedy), in rounds that alternate three modes: every row free, every row constrained to a film schema
(title, year, up to three genres), and half of each in one batch. The grammar's own work (each step's masks
of the constrained rows and each accepted token) is timed where the server does it, by wrapping
``constrained.mask_rows`` and the rows' matchers, and printed as milliseconds per constrained token and as
a share of the wall time; the wall time per generated token of each mode is printed beside it (the modes'
answers differ in length, so those are not one another's baseline; the share is the figure). Run it alone:
the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FILMS = ["Jaws", "Toy Story", "Casablanca", "Alien", "Up", "Heat", "Vertigo", "Psycho", "Fargo", "Rocky"]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer"},
        "genres": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["title", "year", "genres"],
    "additionalProperties": False,
}


class Timed:
    """A matcher whose accept_token and fill_next_token_bitmask add their seconds to ``clock``."""

    def __init__(self, inner: Any, clock: list[float]) -> None:
        self.inner, self.clock = inner, clock

    def accept_token(self, token: int) -> bool:
        tick = time.perf_counter()
        try:
            return self.inner.accept_token(token)
        finally:
            self.clock[0] += time.perf_counter() - tick

    def fill_next_token_bitmask(self, *args: Any) -> Any:
        return self.inner.fill_next_token_bitmask(*args)  # inside mask_rows, timed there


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from multitune.bank import MultiTaskModel
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base
    from multitune.serve import constrained
    from multitune.serve.decode import SamplingParams
    from multitune.serve.engine import Engine
    from multitune.serve.scheduler import Scheduler
    from multitune.storage import save_adapter

    clock = [0.0]
    mask_rows, make_matcher = constrained.mask_rows, constrained.matcher

    def timed_mask_rows(logits: Any, handles: Any) -> Any:
        tick = time.perf_counter()
        try:
            return mask_rows(logits, handles)
        finally:
            clock[0] += time.perf_counter() - tick

    constrained.mask_rows = timed_mask_rows  # decode.sample_tokens looks it up at each step
    constrained.matcher = lambda compiled: Timed(make_matcher(compiled), clock)

    with tempfile.TemporaryDirectory() as tmp:
        bank = MultiTaskModel(load_base("smollm2-135m", device="cpu"))
        bank.add_task("chat", "generation", "lora", LoRAConfig(rank=4))  # B = 0: the base's answers
        save_adapter(bank, "chat", Path(tmp) / "chat")
        del bank
        scheduler = Scheduler(Engine.from_folder(tmp, device="cpu"), max_batch_size=args.rows, max_wait_ms=20)
        scheduler.start()
        fmt = constrained.parse_response_format(
            {"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}}
        )
        prompts = [f"The film {FILMS[i % len(FILMS)]} as JSON:" for i in range(args.rows)]

        def run(flags: list[bool]) -> tuple[float, int, int, float]:
            """(wall s, tokens, constrained tokens, grammar s) of one batch of requests."""
            params = [
                SamplingParams(max_tokens=args.max_tokens, response_format=fmt if flag else None)
                for flag in flags
            ]
            for p in params:
                scheduler.compile_format("chat", p)  # compiled once per schema (cached): not timed
            clock[0] = 0.0
            tick = time.perf_counter()
            handles = [
                scheduler.submit_generate("chat", prompt, p)
                for prompt, p in zip(prompts, params, strict=True)
            ]
            while not all(h.done for h in handles):
                time.sleep(0.002)
            wall = time.perf_counter() - tick
            for h, flag in zip(handles, flags, strict=True):
                if flag and h.finish_reason == "stop":
                    json.loads(h.text)  # a constrained answer that ended is JSON
            tokens = sum(h.completion_tokens for h in handles)
            held = sum(h.completion_tokens for h, f in zip(handles, flags, strict=True) if f)
            return wall, tokens, held, clock[0]

        modes = {
            "free": [False] * args.rows,
            "constrained": [True] * args.rows,
            "half": [i % 2 == 0 for i in range(args.rows)],
        }
        run(modes["half"])  # warm-up: first forwards, the schema's compile
        results: dict[str, list[tuple[float, int, int, float]]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, flags in modes.items():
                results[mode].append(run(flags))
        scheduler.stop()

    print(
        f"smollm2-135m, {args.rows} rows at once, max_tokens {args.max_tokens}, {args.rounds} rounds (medians)"
    )
    print("| mode | tokens | wall ms per token | grammar ms per constrained token | grammar share of wall |")
    print("|---|---|---|---|---|")
    for mode, rows in results.items():
        wall = statistics.median(w / t for w, t, _, _ in rows) * 1e3
        tokens = statistics.median(t for _, t, _, _ in rows)
        if mode == "free":
            print(f"| {mode} | {tokens:.0f} | {wall:.2f} | - | - |")
            continue
        per = statistics.median(g / h for _, _, h, g in rows if h) * 1e3
        share = statistics.median(g / w for w, _, _, g in rows) * 100
        print(f"| {mode} | {tokens:.0f} | {wall:.2f} | {per:.3f} | {share:.2f}% |")


if __name__ == "__main__":
    main()
