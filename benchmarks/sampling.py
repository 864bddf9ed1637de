"""Cost of sampling one decode step's tokens: the server's rows drawn together against one row at a time.

    python benchmarks/sampling.py [--rows 32] [--vocab 49152] [--top-p 0.9] [--rounds 200]

(a) ``decode.sample_tokens``: every sampled row at once (one softmax, the top 256 candidates of the rows with
    top_p < 1 or a full sort where they do not hold the nucleus, one cumulative sum and search; each row's
    uniform draw from its own generator).
(b) the per-row loop the server ran before: for each row a softmax, a sort for top_p, a scatter and a
    ``torch.multinomial`` with the row's generator.

Logits of SmolLM2's vocabulary size, temperature 0.8, of two shapes: ``peaked`` (a Zipf law of exponent 2 over a
random order of the vocabulary per row: the 256 most probable tokens hold the top_p mass, as they did at every
one of 144 sampled steps of SmolLM2-135M at temperature 0.8) and ``flat`` (normal logits x 3: a nucleus of
thousands of tokens, the worst case, sorted in full). The figure is the median over ``--rounds`` of
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

    shapes = {"peaked": peaked(args.rows, args.vocab), "flat": flat(args.rows, args.vocab)}

    def handles() -> list[Handle]:
        params = [SamplingParams(temperature=0.8, top_p=args.top_p, seed=i) for i in range(args.rows)]
        return [Handle("t", "t", [1], p, 1e18, None) for p in params]

    print(f"{args.rows} rows, vocabulary {args.vocab}, top_p {args.top_p}, threads {torch.get_num_threads()}")
    print(f"{'logits':<8}{'together ms':>13}{'one at a time ms':>18}{'ratio':>8}")
    for shape, logits in shapes.items():
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
        print(f"{shape:<8}{together:>13.2f}{alone:>18.2f}{alone / together:>8.2f}")


def peaked(rows: int, vocab: int) -> torch.Tensor:
    """Zipf-shaped logits (probability ~ rank^-2) over a random order of the vocabulary per row."""
    g = torch.Generator().manual_seed(0)
    ranked = -2.0 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    return torch.stack([ranked[torch.randperm(vocab, generator=g)] for _ in range(rows)])


def flat(rows: int, vocab: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3


if __name__ == "__main__":
    main()
