"""GRPO with a verifiable reward: exact-match addition on SmolLM2-135M-Instruct (docs/preference.md).

    python benchmarks/grpo_arithmetic.py OUT [--steps 40] [--max-operand 20] [--held 100] [-- GRPO FLAGS]

Problems "What is A + B? Answer with the number only." with A, B drawn from 1..max-operand (seeded; the
held-out problems are pairs never trained on). The reward is :func:`exact_match` of this file, 1 when the last
integer of the response is A + B and 0 otherwise: no learned judge, nothing to hack but the answer. The script
writes OUT/prompts.jsonl, runs ``multitune grpo --reward-python benchmarks/grpo_arithmetic.py:exact_match``
(a subprocess, as a user runs it) and scores greedy answers to the held-out problems with the adapter off
(the base) and on. Prints the exact-match rates and writes OUT/summary.json. Run it alone for the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "smollm2-135m"
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
NUMBER = re.compile(r"-?\d+")


def exact_match(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the last integer of the response is the sum the prompt asks for, else 0.0 (GSM8K's rule: the
    final number is the answer, so "3 + 4 = 7" and "The answer is 7." are right and "3 + 4 = 8" is not)."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        question, numbers = QUESTION.search(prompt), NUMBER.findall(response.replace(",", ""))
        right = question is not None and bool(numbers)
        out.append(float(right and int(numbers[-1]) == int(question.group(1)) + int(question.group(2))))
    return out


def problems(n: int, held: int, top: int, seed: int) -> tuple[list[str], list[str]]:
    pool = [(a, b) for a in range(1, top + 1) for b in range(1, top + 1)]
    random.Random(seed).shuffle(pool)
    text = [f"What is {a} + {b}? Answer with the number only." for a, b in pool[: n + held]]
    return text[:n], text[n:]


def greedy_rate(model: str, adapter: Path, prompts: list[str]) -> tuple[float, float, list[str]]:
    """(exact-match rate with the adapter off, on; a few answers of the policy)."""
    from multitune.bank import MultiTaskModel
    from multitune.data import Example
    from multitune.models import load_base
    from multitune.storage import load_adapter
    from multitune.training.evaluate import generate_texts

    bank = MultiTaskModel(load_base(model, device="cpu"))
    load_adapter(bank, adapter, "policy")
    rows = [Example(text=p) for p in prompts]
    with bank.disabled():
        base = generate_texts(bank, "policy", rows, max_new_tokens=8, batch_size=64)
    tuned = generate_texts(bank, "policy", rows, max_new_tokens=8, batch_size=64)
    return (
        sum(exact_match(prompts, base)) / len(rows),
        sum(exact_match(prompts, tuned)) / len(rows),
        tuned[:5],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--held", type=int, default=100)
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("grpo", nargs="*", help="more flags for multitune grpo (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = problems(args.train, args.held, args.max_operand, 0)
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train))
    command = [sys.executable, "-m", "multitune", "grpo", "--model", args.model, "--prompts", str(out / "prompts.jsonl"),
               "--reward-python", f"{Path(__file__).resolve()}:exact_match", "--steps", str(args.steps),
               "--batch-size", "4", "--group-size", "8", "--max-new-tokens", "8", "--output", str(out / "grpo"),
               "--quiet", *args.grpo]  # fmt: skip
    tick = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - tick
    history = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    before, after, answers = greedy_rate(args.model, out / "grpo" / "adapter", held)
    summary = {
        "steps": args.steps,
        "train_problems": len(train),
        "held_problems": len(held),
        "max_operand": args.max_operand,
        "grpo_seconds": round(wall, 1),
        "sampled_reward_first5": sum(r["score"] for r in history[:5]) / 5,
        "sampled_reward_last5": sum(r["score"] for r in history[-5:]) / 5,
        "kl_last": history[-1]["kl"],
        "held_exact_match": {"base": before, "grpo": after},
        "answers": dict(zip(held[:5], answers, strict=True)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
