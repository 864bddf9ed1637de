"""Chunked prefill: how long a long prompt stalls the rows that are decoding, and what chunks cost it.

    python benchmarks/chunked_prefill.py [--rows 8] [--prompt-tokens 1024] [--chunks 0,64,128,256,512]

SmolLM2-135M with four perturbed generation tasks (LoRA r4 and r8 on q/v, (IA)^3, prompt tuning 10), served by
the in-process scheduler (no HTTP). ``--rows`` requests (short prompts, 96 new tokens, greedy, tasks in turn)
start decoding; once each has its first tokens, one request with a ``--prompt-tokens``-token prompt (SST-2 test
sentences joined, or the built-in sentences repeated without ../shared) asks for 16 tokens. For each
``--chunks`` value (0: the whole prompt in one forward, as without chunking):

- the running rows' largest gap between two tokens while the long prompt prefills (their stall), and their
  median gap over the run (a decode step);
- the long prompt's time to its first token, and the time until every request has its answer.

Every answer is checked against the same run with chunk 0 (greedy: they must be equal). Run it alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import SENTENCES, build_bank  # noqa: E402  (the same perturbed SmolLM2 tasks)

SST2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "test.csv"


def long_text(tokenizer: Any, tokens: int) -> str:
    """About ``tokens`` tokens of sentences (cut on a word)."""
    if SST2.exists():
        with SST2.open(newline="") as f:
            sentences = [row["sentence"] for row in csv.DictReader(f)]
    else:
        sentences = [f"{s} ({i})" for i, s in enumerate(SENTENCES * 200)]
    text, i = "", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += sentences[i % len(sentences)] + " "
        i += 1
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def one_run(engine: Any, tasks: list[str], chunk: int, rows: int, long_prompt: str) -> dict[str, Any]:
    from multitune.serve.decode import SamplingParams
    from multitune.serve.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch_size=32, max_wait_ms=1, prefill_chunk=chunk, monitor=False)
    scheduler.start()
    try:
        start = time.perf_counter()
        running = [
            scheduler.submit_generate(tasks[i % len(tasks)], SENTENCES[i % len(SENTENCES)], SamplingParams(max_tokens=96))
            for i in range(rows)
        ]  # fmt: skip
        times: list[list[float]] = [[] for _ in running]

        def follow(i: int) -> None:
            for _ in running[i].tokens():
                times[i].append(time.perf_counter())

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(rows)]
        for thread in threads:
            thread.start()
        while min(len(t) for t in times) < 8:  # every row is decoding
            time.sleep(0.005)
        asked = time.perf_counter()
        long = scheduler.submit_generate(tasks[0], long_prompt, SamplingParams(max_tokens=16))
        pieces = long.tokens()
        next(pieces)
        first = time.perf_counter()
        list(pieces)
        for thread in threads:
            thread.join()
        done = time.perf_counter()
    finally:
        scheduler.stop()
    gaps = [b - a for t in times for a, b in zip(t, t[1:], strict=False)]
    during = [b - a for t in times for a, b in zip(t, t[1:], strict=False) if b > asked and a < first]
    return {
        "stall_ms": 1000 * max(during) if during else 0.0,
        "step_ms": 1000 * statistics.median(gaps),
        "ttft_ms": 1000 * (first - asked),
        "wall_s": done - start,
        "answers": [h.text for h in running] + [long.text],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--chunks", default="0,64,128,256,512")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each chunk size (the median is shown)")
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]

    import torch

    from multitune.serve.engine import Engine

    folder = Path(tempfile.mkdtemp(prefix="chunked-prefill-"))
    tasks = build_bank(folder, 4)
    engine = Engine.from_folder(folder, device="cpu")
    prompt = long_text(engine.base.tokenizer, args.prompt_tokens)
    print(
        f"SmolLM2-135M, {len(tasks)} tasks, {args.rows} running rows, a {args.prompt_tokens}-token prompt, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    one_run(engine, tasks, 0, args.rows, prompt)  # warm-up
    results: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        runs = [one_run(engine, tasks, chunk, args.rows, prompt) for _ in range(args.rounds)]
        results[chunk] = {
            key: statistics.median(run[key] for run in runs) for key in ("stall_ms", "step_ms", "ttft_ms", "wall_s")
        }  # fmt: skip
        results[chunk]["answers"] = runs[0]["answers"]
    reference = results[chunks[0]]["answers"]
    for chunk, result in results.items():
        result["answers_equal"] = result.pop("answers") == reference
        print(
            f"chunk {chunk or 'off':>4}: running rows' stall {result['stall_ms']:7.0f} ms (a step "
            f"{result['step_ms']:.0f} ms), long prompt's first token {result['ttft_ms']:7.0f} ms, all done "
            f"{result['wall_s']:.2f} s, answers equal: {result['answers_equal']}"
        )
    print(json.dumps({"rows": args.rows, "prompt_tokens": args.prompt_tokens, "results": results}))


if __name__ == "__main__":
    main()
