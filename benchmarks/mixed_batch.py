"""Throughput of one mixed-task forward: multitune against the bare base model and the peft package.

    python benchmarks/mixed_batch.py [--tasks 16] [--batch 32] [--tokens 64] [--rounds 5] [--device cpu]

SmolLM2-135M, a batch of ``--batch`` rows of ``--tokens`` random tokens (no padding), ``--tasks``
generation tasks spread round-robin over seven kinds (LoRA r8 on q/v and r16 on every projection, prompt
tuning of 10 and 20 virtual tokens, prefix tuning of 16, Houlsby bottleneck adapters, (IA)^3), every
task's tensors randomly perturbed so that none is the identity; row i belongs to task i mod tasks.

Measured, one process, in interleaved rounds (every variant once per round, the order rotating), after a
warm-up round; the figure is the median over ``--rounds``:

(a) multitune: ``bank.model_inputs`` + one causal-LM forward (logits of every position) of the whole
    mixed batch, no grad.
(b) the bare base: a *separate plain copy* of the model (no wrappers anywhere in it) on a batch of the
    same rows and ``tokens + W`` tokens, W the longest soft prompt in the batch: the positions the bank
    runs (prefixes add keys, not positions). The limit for (a).
(c) the peft package serving the same tasks its best way: every LoRA task in one PeftModel, its rows in
    one forward with ``adapter_names`` per row; prompt tuning, prefix tuning and (IA)^3 one forward per
    task with that task's PeftModel; adapter rows as the bare base model (peft has no bottleneck adapters,
    so (c) is a lower bound on peft's time). Weights are the bank's, through ``export_peft``.
(d) scaling: banks of 4 and of ``--scale`` tasks cycling over four kinds (LoRA r8, prompt 20, prefix 16,
    adapter), the same batch, row i of kind i mod 4 and the rows' tasks spread over the bank's slots.
(e) generation: ``bank.generate`` of the batch's prompts (left-padded, lengths tokens/2..tokens), mixed
    tasks, greedy, exactly ``--new-tokens`` new tokens, against the plain copy's ``generate`` on the same
    prompts.

Throughput is text tokens per second (batch x tokens / time; new tokens for generation) for every
variant, so ratios compare the same useful work. Targets: (a) >= 0.95 (b), (a) >= 1.5 (c),
(a, --scale tasks) >= 0.95 (a, 4 tasks), generation >= 0.9 x the base on the same positions and >= 0.85 x
the plain base. benchmarks/decode_step.py breaks a decode step down per method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2-135m"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kinds() -> list[tuple[str, str, Any]]:
    """(name, method, config) of the task kinds, in round-robin order."""
    from multitune.methods.adapter import AdapterConfig
    from multitune.methods.ia3 import IA3Config
    from multitune.methods.lora import LoRAConfig
    from multitune.methods.prefix import PrefixConfig
    from multitune.methods.prompt import PromptConfig

    return [
        ("lora8", "lora", LoRAConfig(rank=8, alpha=16)),
        ("lora16", "lora", LoRAConfig(rank=16, alpha=32, target_modules=ALL_PROJ)),
        ("prompt10", "prompt", PromptConfig(num_virtual_tokens=10, init="random")),
        ("prompt20", "prompt", PromptConfig(num_virtual_tokens=20, init="random")),
        ("prefix16", "prefix", PrefixConfig(num_virtual_tokens=16, projection=False)),
        ("adapter", "adapter", AdapterConfig(reduction_factor=16)),
        ("ia3", "ia3", IA3Config()),
    ]


SCALE_KINDS = ["lora8", "prompt20", "prefix16", "adapter"]


def build_bank(base: Any, names: list[str], seed: int = 0) -> Any:
    """A bank with one task per entry of ``names`` (kind names), tensors perturbed away from identity."""
    from multitune.bank import MultiTaskModel

    by_name = {k[0]: k for k in kinds()}
    bank = MultiTaskModel(base)
    generator = torch.Generator().manual_seed(seed)
    for i, kind in enumerate(names):
        _, method, config = by_name[kind]
        task = f"{kind}-{i}"
        bank.add_task(task, "generation", method, config)
        with torch.no_grad():
            for param in bank.task_parameters(task).values():
                noise = torch.randn(param.shape, generator=generator) * 0.02
                param.add_(noise.to(param.device, param.dtype))
    bank.eval()
    return bank


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_rounds(variants: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per variant: a warm-up round, then ``rounds`` rounds in rotating order."""
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(variants[name], device))
        print(
            f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
            file=sys.stderr,
        )
    return {n: statistics.median(t) for n, t in times.items()}


def mixed_forward(
    bank: Any, ids: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor
) -> Callable[[], Any]:
    def run() -> Any:
        rows = task_ids.clone()  # a new batch's routing: nothing cached for the previous one applies
        with torch.no_grad(), bank.routed(rows):
            inputs, _ = bank.model_inputs(ids, mask, rows)
            return bank.base.model(**inputs).logits

    return run


def peft_variant(
    bank: Any,
    base_copies: Callable[[], Any],
    ids: torch.Tensor,
    mask: torch.Tensor,
    task_ids: torch.Tensor,
    folder: Path,
) -> Callable[[], Any]:
    """peft's best serving of the bank's tasks: one mixed LoRA forward, one forward per other task."""
    import peft

    from multitune.interop.peft import export_peft

    slots = bank.slots
    rows_of: dict[str, torch.Tensor] = {}
    for slot in sorted(set(task_ids.tolist())):
        rows_of[slots[slot]] = (task_ids == slot).nonzero(as_tuple=True)[0]
    by_method: dict[str, list[str]] = {}
    for task in rows_of:
        by_method.setdefault(bank.tasks[task].method, []).append(task)
    calls: list[Callable[[], Any]] = []

    def one_peft_model(tasks: list[str]) -> Any:
        """One PeftModel on a fresh base copy holding every task of ``tasks`` as a named adapter."""
        model = peft.PeftModel.from_pretrained(
            base_copies(), str(export_peft(bank, tasks[0], folder / tasks[0])), adapter_name=tasks[0]
        )
        for task in tasks[1:]:
            model.load_adapter(str(export_peft(bank, task, folder / task)), adapter_name=task)
        return model.eval()

    lora = by_method.get("lora", [])
    if lora:
        model = one_peft_model(lora)
        rows = torch.cat([rows_of[t] for t in lora])
        names = [t for t in lora for _ in range(len(rows_of[t]))]
        calls.append(
            lambda m=model, r=rows, n=names: m(input_ids=ids[r], attention_mask=mask[r], adapter_names=n)
        )

    ia3 = by_method.get("ia3", [])
    if ia3:
        model = one_peft_model(ia3)

        def ia3_task(m: Any = model, t: str = "", r: torch.Tensor = ids) -> Any:
            m.set_adapter(t)
            return m(input_ids=ids[r], attention_mask=mask[r])

        for task in ia3:
            calls.append(lambda m=model, t=task, r=rows_of[task]: ia3_task(m, t, r))

    prompt_learning = by_method.get("prompt", []) + by_method.get("prefix", [])
    if prompt_learning:
        shared = base_copies()  # prompt and prefix tuning wrap the model without changing its layers
        for task in prompt_learning:
            path = export_peft(bank, task, folder / task)
            model = peft.PeftModel.from_pretrained(shared, str(path), adapter_name=task)
            model.eval()
            calls.append(lambda m=model, r=rows_of[task]: m(input_ids=ids[r], attention_mask=mask[r]))

    adapter = by_method.get("adapter", [])
    if adapter:  # no bottleneck adapters in peft: their rows cost the bare base (a lower bound)
        plain = base_copies()
        rows = torch.cat([rows_of[t] for t in adapter])
        calls.append(lambda m=plain, r=rows: m(input_ids=ids[r], attention_mask=mask[r]))

    def run() -> None:
        with torch.no_grad():
            for call in calls:
                call()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks", type=int, default=16, help="tasks in the mixed bank (round-robin over 7 kinds)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="text tokens per row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scale", type=int, default=256, help="tasks in the large bank of the scaling test (0: skip)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="generated tokens per row (0: skip generation)"
    )
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args(argv)

    from multitune.models import load_base

    device = torch.device(args.device)
    torch.manual_seed(0)
    names = [k[0] for k in kinds()]
    base = load_base(MODEL, device=device)
    dtype = base.model.dtype
    bank = build_bank(base, [names[i % len(names)] for i in range(args.tasks)])
    plain = load_base(MODEL, device=device, dtype=dtype)  # (b): a separate copy, no wrapper anywhere

    gen = torch.Generator().manual_seed(1)
    vocab = base.tokenizer.vocab_size
    ids = torch.randint(100, vocab - 1, (args.batch, args.tokens), generator=gen).to(device)
    mask = torch.ones_like(ids)
    task_ids = (torch.arange(args.batch) % args.tasks).to(device)
    prompted = [bank.slots[int(s)] for s in task_ids.tolist()]
    width = max((bank.virtual_positions(t) for t in prompted if bank.tasks[t].method == "prompt"), default=0)
    long_ids = torch.randint(100, vocab - 1, (args.batch, args.tokens + width), generator=gen).to(device)
    long_mask = torch.ones_like(long_ids)
    tokens = args.batch * args.tokens

    variants: dict[str, Callable[[], Any]] = {
        "multitune mixed": mixed_forward(bank, ids, mask, task_ids),
        "base (plain copy)": lambda: plain.model(input_ids=long_ids, attention_mask=long_mask).logits,
    }
    tmp = tempfile.TemporaryDirectory()
    if not args.skip_peft:
        variants["peft grouped"] = peft_variant(
            bank,
            lambda: load_base(MODEL, device=device, dtype=dtype).model,
            ids,
            mask,
            task_ids,
            Path(tmp.name),
        )
    if args.scale:
        small_names = [SCALE_KINDS[i % 4] for i in range(4)]
        large_names = [SCALE_KINDS[i % 4] for i in range(args.scale)]
        small = build_bank(load_base(MODEL, device=device, dtype=dtype), small_names, seed=2)
        large = build_bank(load_base(MODEL, device=device, dtype=dtype), large_names, seed=3)
        per_kind = args.scale // 4
        spread = torch.tensor(
            [
                4 * ((i // 4) * per_kind // max(1, args.batch // 4) % per_kind) + i % 4
                for i in range(args.batch)
            ],
            device=device,
        )
        variants["scale: 4 tasks"] = mixed_forward(
            small, ids, mask, torch.arange(args.batch, device=device) % 4
        )
        variants[f"scale: {args.scale} tasks"] = mixed_forward(large, ids, mask, spread)

    print(
        f"forward: {MODEL}, batch {args.batch} x {args.tokens} tokens, {args.tasks} tasks, "
        f"prompt width {width}, device {device}, dtype {dtype}, threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    seconds = run_rounds(variants, args.rounds, device)

    gen_seconds: dict[str, float] = {}
    if args.new_tokens:
        lengths = torch.randint(args.tokens // 2, args.tokens + 1, (args.batch,), generator=gen)
        prompt_ids = torch.full((args.batch, args.tokens), base.tokenizer.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, n in enumerate(lengths.tolist()):  # left padding
            prompt_ids[i, args.tokens - n :] = torch.randint(100, vocab - 1, (n,), generator=gen)
            prompt_mask[i, args.tokens - n :] = 1
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        opts = {
            "max_new_tokens": args.new_tokens,
            "min_new_tokens": args.new_tokens,
            "do_sample": False,
            "pad_token_id": base.tokenizer.pad_token_id,
        }

        def bank_generate() -> Any:
            out = bank.generate(prompt_ids, prompt_mask, task_ids.clone(), **opts)
            assert out.shape[1] == args.new_tokens
            return out

        def base_generate() -> Any:
            with torch.no_grad():
                out = plain.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **opts)
            assert out.shape[1] == args.tokens + args.new_tokens
            return out

        # The base on the positions the bank runs: W more (masked) positions before every prompt, as (b).
        wide_ids = torch.cat(
            [
                torch.full((args.batch, width), base.tokenizer.pad_token_id, dtype=torch.long, device=device),
                prompt_ids,
            ],
            dim=1,
        )
        wide_mask = torch.cat(
            [torch.zeros((args.batch, width), dtype=torch.long, device=device), prompt_mask], dim=1
        )

        def base_generate_wide() -> Any:
            with torch.no_grad():
                return plain.model.generate(input_ids=wide_ids, attention_mask=wide_mask, **opts)

        print(f"generation: {args.batch} prompts, {args.new_tokens} new tokens", file=sys.stderr)
        gen_seconds = run_rounds(
            {
                "multitune generate": bank_generate,
                "base generate": base_generate,
                f"base generate (+{width} pos)": base_generate_wide,
            },
            max(3, args.rounds // 2),
            device,
        )
    tmp.cleanup()

    rate = {n: tokens / s for n, s in seconds.items()}
    print(
        f"\n{MODEL}, batch {args.batch} x {args.tokens}, {args.tasks} tasks, {device}, median of {args.rounds}"
    )
    print(f"{'variant':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, s in seconds.items():
        print(f"{name:<28}{s:>10.3f}{rate[name]:>12.0f}")
    gen_rate = {n: args.batch * args.new_tokens / s for n, s in gen_seconds.items()}
    for name, s in gen_seconds.items():
        print(f"{name:<28}{s:>10.3f}{gen_rate[name]:>12.0f}")
    print(f"\n{'target':<44}{'ratio':>8}{'goal':>8}  met")
    checks = [("(a) multitune / (b) base", rate["multitune mixed"] / rate["base (plain copy)"], 0.95)]
    if "peft grouped" in rate:
        checks.append(
            ("(a) multitune / (c) peft (lower bound)", rate["multitune mixed"] / rate["peft grouped"], 1.5)
        )
    if args.scale:
        checks.append(
            (
                f"(a) {args.scale} tasks / (a) 4 tasks",
                rate[f"scale: {args.scale} tasks"] / rate["scale: 4 tasks"],
                0.95,
            )
        )
    if gen_rate:
        checks.append(
            ("generate: multitune / base", gen_rate["multitune generate"] / gen_rate["base generate"], 0.85)
        )
        wide = next(n for n in gen_rate if n.startswith("base generate (+"))
        checks.append((f"generate: multitune / {wide}", gen_rate["multitune generate"] / gen_rate[wide], 0.9))
    for name, ratio, goal in checks:
        print(f"{name:<44}{ratio:>8.2f}{goal:>8.2f}  {'yes' if ratio >= goal else 'NO'}")


if __name__ == "__main__":
    main()
