"""Cost of one decode step per method, against the bare base's step on the same positions.

    python benchmarks/decode_step.py [--batch 32] [--tokens 64] [--steps 20] [--rounds 5] [--device cpu]

SmolLM2-135M. For each variant a bank holds ``--tasks`` generation tasks of one kind (LoRA r8 on q/v, LoRA
r16 on every projection, (IA)^3, Houlsby adapters, prompt tuning of 20 virtual tokens, prefix tuning of 16),
or, for ``mixed``, 16 tasks over all seven kinds of benchmarks/mixed_batch.py; every task's tensors are
perturbed away from the identity and row i of the ``--batch`` rows belongs to task i mod tasks. ``single`` is
one LoRA r8 task on every row (the bank's one-task fast path).

Each variant's bank prefills ``--tokens`` random tokens per row (``bank.run`` with the KV cache, as the
server's prefill does) and then times decode steps exactly as the server's ``DecodeBatch.step`` runs them:
one token per row through the base model with the cache, the rows routed once per batch. After each step
the cache is cropped back to its prefilled length, so every timed step sees the same cache. The base's step
runs a separate plain copy of the model (no wrapper anywhere in it) with a cache of the same length (the
text plus the variant's virtual positions: prompt and prefix tasks decode over more positions).

Measured in interleaved rounds (every variant and its base once per round, the order rotating) after a
warm-up round; the figure is the median over rounds of the mean step time over ``--steps`` steps. A method
whose line falls has got slower on its own, whatever the others do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from mixed_batch import MODEL, build_bank, kinds  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "single lora8": ["lora8"],
    "lora8": ["lora8"],
    "lora16": ["lora16"],
    "ia3": ["ia3"],
    "adapter": ["adapter"],
    "prompt20": ["prompt20"],
    "prefix16": ["prefix16"],
    "mixed": [k[0] for k in kinds()],
}


def bank_stepper(
    bank: Any, ids: torch.Tensor, task_ids: torch.Tensor, steps: int
) -> tuple[Callable[[], float], int]:
    """A function timing ``steps`` decode steps of ``bank`` (mean seconds per step), and the cache length."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        routed = bank.run(ids, mask, task_ids, use_cache=True, logits_to_keep=1)
    cache, full = routed.out.cache, routed.attention_mask
    length = cache.get_seq_length()
    last = routed.out.logits[:, -1].argmax(-1)
    step_mask = torch.cat([full, full.new_ones(len(ids), 1)], dim=1)
    positions = step_mask.sum(dim=1, keepdim=True) - 1

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad(), bank.routed(task_ids):
            for _ in range(steps):
                bank.base.model(
                    input_ids=last[:, None],
                    attention_mask=step_mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                )
                cache.crop(-1)  # back to the prefilled length
        return (time.perf_counter() - start) / steps

    return run, length


def base_stepper(model: Any, batch: int, length: int, vocab: int, steps: int) -> Callable[[], float]:
    """The same on the plain copy, its cache ``length`` positions long."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(100, vocab - 1, (batch, length), generator=gen).to(model.device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    last = out.logits[:, -1].argmax(-1)
    mask = torch.ones((batch, length + 1), dtype=torch.long, device=model.device)
    positions = torch.full((batch, 1), length, dtype=torch.long, device=model.device)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                model(
                    input_ids=last[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                )
                cache.crop(-1)  # back to the prefilled length
        return (time.perf_counter() - start) / steps

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="prefilled text tokens per row")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per one-kind bank (mixed: 16)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = parser.parse_args(argv)

    from multitune.models import load_base

    device = torch.device(args.device)
    torch.manual_seed(0)
    plain = load_base(MODEL, device=device)
    vocab = plain.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, vocab - 1, (args.batch, args.tokens), generator=gen).to(device)
    chosen = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    timers: dict[str, Callable[[], float]] = {}
    lengths: dict[str, int] = {}
    bases: dict[int, Callable[[], float]] = {}
    for seed, name in enumerate(chosen):
        names = VARIANTS[name]
        count = 1 if name.startswith("single") else 16 if name == "mixed" else args.tasks
        bank = build_bank(
            load_base(MODEL, device=device), [names[i % len(names)] for i in range(count)], seed
        )
        task_ids = (torch.arange(args.batch) % count).to(device)
        timers[name], lengths[name] = bank_stepper(bank, ids, task_ids, args.steps)
        if lengths[name] not in bases:
            bases[lengths[name]] = base_stepper(plain.model, args.batch, lengths[name], vocab, args.steps)
    variants = {**timers, **{f"base @{n}": run for n, run in bases.items()}}
    print(
        f"decode step: {MODEL}, batch {args.batch}, {args.tokens} prefilled tokens, {args.steps} steps per "
        f"timing, device {device}, threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(variants[name]())
        print(f"  round {r + 1}/{args.rounds}", file=sys.stderr)
    median = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n{MODEL}, batch {args.batch}, decode step, median of {args.rounds} rounds, {device}")
    print(f"{'variant':<16}{'positions':>10}{'ms/step':>10}{'base ms':>10}{'base/variant':>14}")
    for name in chosen:
        base = median[f"base @{lengths[name]}"]
        print(
            f"{name:<16}{lengths[name]:>10}{1000 * median[name]:>10.1f}{1000 * base:>10.1f}"
            f"{base / median[name]:>14.2f}"
        )


if __name__ == "__main__":
    main()
