"""DPO, SimPO and ORPO on the policy's own samples, ranked by a sentiment classifier (docs/preference.md).

    multitune train --model minilm --data $D/sst2/train.csv --validation-data $D/sst2/dev.csv \\
        --test-data $D/sst2/dev.csv --max-examples 2000 --epochs 1 --output sst2     # the judge
    python benchmarks/dpo_own_samples.py sst2 OUT [--train-prompts 600] [--held-prompts 100] [--samples 4]
        [--losses sigmoid,simpo,orpo]

1. Prompts: the first 4-6 words of SST-2 training sentences (seeded; the held-out prompts are other sentences).
2. The base policy (SmolLM2-135M-Instruct; a fresh LoRA task is the base) samples ``samples`` responses of at most
   16 tokens per prompt (temperature 1); the judge scores each (P(positive) of the response alone).
3. One pair per prompt: chosen = the most positive sample, rejected = the least, kept when they differ by at
   least ``--min-gap``: OUT/train.jsonl and OUT/held.jsonl (the held-out prompts' pairs).
4. For each loss, ``multitune dpo --data train.jsonl --validation-data held.jsonl --loss L`` (a subprocess, as a
   user runs it); its held-out preference accuracy is read from result.json.
5. The trained policy and the base each sample 2 responses per held-out prompt (the same seed); the judge's
   mean P(positive) of each is the policy's mean reward.

Prints a table and writes OUT/summary.json. Run it alone for the wall times to mean anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "train.csv"
MODEL = "smollm2-135m"
BETAS = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}  # simpo: its paper's 2-2.5


def prompt_stubs(n: int, seed: int, data: Path = DATA) -> list[str]:
    """The first 4-6 words of ``n`` seeded SST-2 sentences of at least 8 words (``data``: train.csv by default)."""
    with open(data, newline="") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f) if len(row["sentence"].split()) >= 8]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    return [" ".join(s.split()[: rng.randint(4, 6)]) for s in sentences[:n]]


def sampler(model: str, adapter: str | None):  # noqa: ANN201
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base
    from multitune.storage import load_adapter

    bank = MultiTaskModel(load_base(model, device="cpu"))
    if adapter is None:
        bank.add_task("policy", "generation", "lora")
    else:
        load_adapter(bank, adapter, "policy")
    return bank


def sample(bank, prompts: list[str], k: int, seed: int) -> list[list[str]]:  # noqa: ANN001
    import torch

    from multitune.data import Example
    from multitune.training.evaluate import generate_texts

    torch.manual_seed(seed)
    rows = [Example(text=p) for p in prompts for _ in range(k)]
    texts = generate_texts(bank, "policy", rows, max_new_tokens=16, batch_size=64, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def judge(folder: str):  # noqa: ANN201
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base
    from multitune.preference.rewards import reward_from_classifier
    from multitune.storage import load_adapter, read_adapter_config

    meta = read_adapter_config(Path(folder) / "adapter")
    bank = MultiTaskModel(load_base(meta["base_model"], device="cpu"))
    load_adapter(bank, Path(folder) / "adapter", "judge")
    fn = reward_from_classifier(bank, "judge", "positive", batch_size=64)
    return lambda texts: fn([""] * len(texts), texts).tolist()


def pairs(prompts: list[str], samples: list[list[str]], scores: list[list[float]], gap: float) -> list[dict]:
    out = []
    for prompt, texts, values in zip(prompts, samples, scores, strict=True):
        best = max(range(len(texts)), key=values.__getitem__)
        worst = min(range(len(texts)), key=values.__getitem__)
        if values[best] - values[worst] >= gap and texts[best] != texts[worst]:
            out.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="run folder of the sentiment judge (multitune train on SST-2)")
    parser.add_argument("out")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--train-prompts", type=int, default=600)
    parser.add_argument("--held-prompts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--min-gap", type=float, default=0.2)
    parser.add_argument("--losses", default="sigmoid,simpo,orpo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--beta", action="append", default=[], metavar="LOSS=B", help="another beta for a loss"
    )
    parser.add_argument("--reuse", action="store_true", help="train on OUT's pairs of an earlier run")
    args = parser.parse_args()
    betas = {**BETAS, **{k: float(v) for k, v in (item.split("=") for item in args.beta)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stubs = prompt_stubs(args.train_prompts + args.held_prompts, 0)
    train_prompts, held_prompts = stubs[: args.train_prompts], stubs[args.train_prompts :]
    score = judge(args.classifier)
    summary: dict = {"model": args.model, "samples": args.samples, "min_gap": args.min_gap, "runs": {}}

    tick = time.perf_counter()
    base = sampler(args.model, None)
    if args.reuse:
        train, held = (
            [json.loads(x) for x in (out / f).read_text().splitlines()] for f in ("train.jsonl", "held.jsonl")
        )
        summary = {**json.loads((out / "summary.json").read_text()), "runs": {}}
    else:
        own = sample(base, stubs, args.samples, 0)
        values = [score(texts) for texts in own]
        summary["sampling_seconds"] = round(time.perf_counter() - tick, 1)
        train = pairs(train_prompts, own[: args.train_prompts], values[: args.train_prompts], args.min_gap)
        held = pairs(held_prompts, own[args.train_prompts :], values[args.train_prompts :], args.min_gap)
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "held.jsonl", held)
        summary["pairs"] = {"train": len(train), "held": len(held)}
        summary["sample_mean_reward"] = mean([v for row in values for v in row])
    print(f"{len(stubs) * args.samples} samples in {summary['sampling_seconds']} s, mean reward "
          f"{summary['sample_mean_reward']:.3f}; {len(train)} training pairs, {len(held)} held-out pairs", flush=True)  # fmt: skip

    base_reward = mean([v for texts in sample(base, held_prompts, 2, 1) for v in score(texts)])
    summary["base_reward"] = base_reward
    del base
    for loss in args.losses.split(","):
        run = out / (loss if betas[loss] == BETAS[loss] else f"{loss}-beta{betas[loss]:g}")
        command = [sys.executable, "-m", "multitune", "dpo", "--model", args.model, "--data", str(out / "train.jsonl"),
                   "--validation-data", str(out / "held.jsonl"), "--loss", loss, "--beta", str(betas[loss]),
                   "--epochs", str(args.epochs), "--output", str(run), "--quiet"]  # fmt: skip
        tick = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - tick
        result = json.loads((run / "result.json").read_text())
        policy = sampler(args.model, str(run / "adapter"))
        reward = mean([v for texts in sample(policy, held_prompts, 2, 1) for v in score(texts)])
        del policy
        summary["runs"][loss] = {
            "beta": betas[loss],
            "accuracy": result["preference_accuracy"],
            "steps": result["steps"],
            "best_step": result["best_step"],
            "mean_reward": reward,
            "wall_seconds": round(wall, 1),
        }
        print(f"{loss}: held-out preference accuracy {result['preference_accuracy']['before']:.3f} -> "
              f"{result['preference_accuracy']['after']:.3f}; mean reward {base_reward:.3f} -> {reward:.3f}; "
              f"{wall:.0f} s", flush=True)  # fmt: skip
    name = "summary.json" if not args.reuse else f"summary-{'-'.join(summary['runs'])}.json"
    (out / name).write_text(json.dumps(summary, indent=2))
    print(
        "| loss | beta | held-out preference accuracy | mean reward (base -> policy) | steps (best) | wall |"
    )
    print("|---|---|---|---|---|---|")
    for loss, r in summary["runs"].items():  # keyed by loss: one beta per loss in a run
        print(f"| {loss} | {r['beta']} | {r['accuracy']['before']:.3f} -> {r['accuracy']['after']:.3f} | "
              f"{base_reward:.3f} -> {r['mean_reward']:.3f} | {r['steps']} ({r['best_step']}) | {r['wall_seconds']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
