"""Cost of sampling one decode step's tokens: the server's rows drawn together against one row at a time.

    python benchmarks/sampling.py [--rows 32] [--vocab 49152] [--top-p 0.9] [--rounds 200]

(a) ``decode.sample_tokens``: every sampled row at once (one softmax, one sort when a row has top_p < 1, one
    cumulative sum and search; each row's uniform draw from its own generator).
(b) the per-row loop the server ran before: for each row a softmax, a sort for top_p, a scatter and a
    ``torch.multinomial`` with the row's generator.

Random logits of SmolLM2's vocabulary size, temperature 0.8; the figure is the median over ``--rounds`` of
milliseconds per step, measured in alternating order in one process. The step it sits in: a decode step of 32
rows costs about 100 ms on the 2-core CPU (benchmarks/decode_step.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multitune.serve.decode import Handle, SamplingParams, sample_tokens


def one_at_a_time(logits: torch.Tensor, handles: list[Handle]) -> list[int]:
    """The former per-row sampler (decode.draw before the rows were drawn together)."""
    tokens = []
    for row, handle in zip(logits, handles, strict=True):
        p = handle.params
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        if handle.generator is None:
            handle.generator = torch.Generator()
            handle.generator.manual_seed(p.seed or 0)
        tokens.append(int(torch.multinomial(probs, 1, generator=handle.generator)))
    return tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)

    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3

    def handles() -> list[Handle]:
        params = [SamplingParams(temperature=0.8, top_p=args.top_p, seed=i) for i in range(args.rows)]
        return [Handle("t", "t", [1], p, 1e18, None) for p in params]

    variants = {"together": (sample_tokens, handles()), "one at a time": (one_at_a_time, handles())}
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds + 5):
        for name in list(variants)[r % 2 :] + list(variants)[: r % 2]:
            fn, hs = variants[name]
            start = time.perf_counter()
            fn(logits, hs)
            if r >= 5:  # warm-up
                times[name].append(time.perf_counter() - start)
    together, alone = (1000 * statistics.median(times[n]) for n in variants)
    print(f"{args.rows} rows, vocabulary {args.vocab}, top_p {args.top_p}, threads {torch.get_num_threads()}")
    print(f"{'variant':<16}{'ms/step':>10}")
    print(f"{'together':<16}{together:>10.2f}\n{'one at a time':<16}{alone:>10.2f}")
    print(f"one at a time / together: {alone / together:.2f}")


if __name__ == "__main__":
    main()
