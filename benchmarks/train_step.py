"""LoRA training steps per second and peak memory: multitune against the peft package.

    python benchmarks/train_step.py [--steps 12] [--models minilm,smollm2-135m]

For each model, the same loop (AdamW, forward, loss, backward, step) runs on the same token batches
with LoRA r=8, alpha=16, dropout 0.05 on the family's default targets (query/value, q_proj/v_proj):

- MiniLM (encoder): batch 32 x 64 tokens, mean-pooled classification head, cross-entropy.
- SmolLM2-135M (decoder): batch 8 x 128 tokens, causal LM loss on every token.

Time: both variants live in this process on their own copy of the base and run in alternating rounds,
so drift in machine load hits both alike; the figure is the median step time per variant.
Memory: on CPU a process's peak RSS never comes down, so each variant's peak is measured in a fresh
child process (the same script with --probe): the peak RSS sampled every 2 ms during the steps, minus
the RSS just before the first step (activations, gradients and AdamW state), and the whole-process peak.
On a GPU the allocator's peak is used instead. Ratios are multitune / peft: below 1.0 is better.
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
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {"minilm": (32, 64), "smollm2-135m": (8, 128)}


def make_batches(base: Any, model: str, n: int) -> list[dict[str, torch.Tensor]]:
    batch, length = SHAPES[model]
    generator = torch.Generator().manual_seed(0)
    vocab = base.tokenizer.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(100, vocab - 1, (batch, length), generator=generator)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "class_labels": torch.randint(0, 2, (batch,), generator=generator),
            }
        )
    return out


def build(variant: str, model: str, device: str) -> tuple[Any, list[torch.nn.Parameter]]:
    """A step function and its trainable parameters, for 'multitune' or 'peft'."""
    from multitune.bank import MultiTaskModel
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base

    base = load_base(model, device=device)
    classification = base.arch == "encoder"
    torch.manual_seed(0)
    if variant == "multitune":
        bank = MultiTaskModel(base)
        bank.add_task(
            "t",
            "classification" if classification else "generation",
            "lora",
            LoRAConfig(rank=8, alpha=16, dropout=0.05),
            ["a", "b"] if classification else None,
        )
        bank.train()
        slot = torch.zeros(SHAPES[model][0], dtype=torch.long, device=device)

        def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = {**b, "task_ids": slot}
            if not classification:
                batch = {k: v for k, v in batch.items() if k != "class_labels"} | {"labels": b["input_ids"]}
            return bank(batch)

        return loss_fn, list(bank.task_parameters("t").values()), base

    import peft

    targets = list(base.family.lora_targets)
    model_ = peft.get_peft_model(
        base.model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets)
    )
    model_.train()
    head = torch.nn.Linear(base.hidden_size, 2, device=device) if classification else None
    params = [p for p in model_.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        if classification:
            hidden = model_(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            weights = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return F.cross_entropy(head(pooled), b["class_labels"])
        logits = model_(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["input_ids"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    return loss_fn, params, base


def step_fn(loss_fn: Any, params: list[torch.nn.Parameter]) -> Any:
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def probe(variant: str, model: str, steps: int, device: str) -> dict[str, float]:
    """Run in a fresh process: peak memory of the training steps of one variant."""
    loss_fn, params, base = build(variant, model, device)
    step = step_fn(loss_fn, params)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(base, model, steps)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for b in batches:
            step(b)
        torch.cuda.synchronize()
        return {
            "delta_mb": (torch.cuda.max_memory_allocated() - before) / 2**20,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
    before, peak, done = rss(), [rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for b in batches:
        step(b)
    done.set()
    sampler.join()
    return {"delta_mb": (peak[0] - before) / 2**20, "peak_mb": peak[0] / 2**20}


def time_both(model: str, steps: int, rounds: int, device: str) -> dict[str, float]:
    variants = {}
    for variant in ("multitune", "peft"):
        loss_fn, params, base = build(variant, model, device)
        variants[variant] = step_fn(loss_fn, params)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(base, model, steps)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for step in variants.values():  # warm-up: first steps allocate and pick kernels
        step(batches[0])
        step(batches[1 % len(batches)])
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            for b in batches:
                start = time.perf_counter()
                variants[v](b)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (time)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.models, args.steps, args.device)))
        return
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for model in args.models.split(","):
        median = time_both(model, args.steps, args.rounds, args.device)
        memory = {}
        for variant in ("multitune", "peft"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--probe",
                    variant,
                    "--models",
                    model,
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        row = {
            "model": model,
            "batch": "x".join(map(str, SHAPES[model])),
            "steps_per_s": {v: round(1 / t, 3) for v, t in median.items()},
            "time_ratio": round(median["multitune"] / median["peft"], 3),
            "train_memory_mb": {v: round(m["delta_mb"], 1) for v, m in memory.items()},
            "peak_rss_mb": {v: round(m["peak_mb"], 1) for v, m in memory.items()},
            "memory_ratio": round(memory["multitune"]["delta_mb"] / memory["peft"]["delta_mb"], 3),
            "peak_ratio": round(memory["multitune"]["peak_mb"] / memory["peft"]["peak_mb"], 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| model | batch | steps/s multitune | steps/s peft | time ratio | train memory MB (mt / peft) | "
        "memory ratio | peak MB (mt / peft) | peak ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, m, p = r["steps_per_s"], r["train_memory_mb"], r["peak_rss_mb"]
        print(
            f"| {r['model']} | {r['batch']} | {s['multitune']} | {s['peft']} | {r['time_ratio']} | "
            f"{m['multitune']} / {m['peft']} | {r['memory_ratio']} | {p['multitune']} / {p['peft']} | "
            f"{r['peak_ratio']} |"
        )


if __name__ == "__main__":
    main()
