"""``--packing`` measured: training examples per second with and without, and the loss of both.

    python benchmarks/packing.py [--rows 96] [--batch-size 8] [--max-length 256] [--rounds 3]

SmolLM2-135M-Instruct with one LoRA generation task (r8, dropout 0), Alpaca rows (the shared data set,
seeded shuffle). The same batches of ``--batch-size`` examples are trained (forward, backward, AdamW step)
padded (``encode.collate``: every row as long as the batch's longest) and packed (``encode.pack``: one row of
the examples end to end, no padding), alternating by round in one process so that the machine's state is the
same for both; reported: the median examples/s of each over the rounds, their ratio, the share of padding
tokens the padded batches compute, and the first batch's loss both ways (equal: packing changes the batch's
layout, not its loss). CPU; nothing else may run while it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "alpaca" / "alpaca_5000.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from multitune.bank import MultiTaskModel
    from multitune.data import Example
    from multitune.encode import collate, encode_task, pack, to_device
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base

    rows = json.loads(ALPACA.read_text())
    random.Random(0).shuffle(rows)
    examples = [
        Example(text=r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), response=r["output"])
        for r in rows[: args.rows]
    ]
    bank = MultiTaskModel(load_base("smollm2-135m"))
    bank.add_task("alpaca", "generation", "lora", LoRAConfig(rank=8, alpha=16, dropout=0.0))
    features = encode_task(bank, "alpaca", examples, args.max_length)
    pad = bank.base.tokenizer.pad_token_id
    chunks = [features[i : i + args.batch_size] for i in range(0, len(features), args.batch_size)]
    optimizer = torch.optim.AdamW(list(bank.task_parameters("alpaca").values()), lr=1e-4)
    layouts = {
        "padded": lambda chunk: collate(chunk, pad, 0),
        "packed": lambda chunk: pack(chunk, 0),
    }
    real = sum(len(f["input_ids"]) for f in features)
    padded = sum(len(c) * max(len(f["input_ids"]) for f in c) for c in chunks)
    first = {}
    for name, layout in layouts.items():  # the loss of the first batch, before any step
        with torch.no_grad():
            nll, count = bank.lm_loss(to_device(layout(chunks[0]), bank.base.device))
        first[name] = float(nll / count)
    speed: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, layout in layouts.items():
            start = time.perf_counter()
            for chunk in chunks:
                nll, count = bank.lm_loss(to_device(layout(chunk), bank.base.device))
                (nll / count).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            speed[name].append(len(features) / (time.perf_counter() - start))
    median = {name: statistics.median(v) for name, v in speed.items()}
    for name in layouts:
        print(
            f"{name:<7} {median[name]:6.2f} examples/s (rounds: {', '.join(f'{v:.2f}' for v in speed[name])})"
        )
    print(
        f"packed / padded: {median['packed'] / median['padded']:.2f}x; the padded batches compute "
        f"{padded - real} padding tokens beside {real} real ones ({(padded - real) / padded:.0%}); first batch's "
        f"loss padded {first['padded']:.5f}, packed {first['packed']:.5f}"
    )


if __name__ == "__main__":
    main()
