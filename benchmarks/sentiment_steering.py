"""Sentiment steering with PPO and GRPO on one rollout budget (docs/preference.md; TRL's gpt2-sentiment example).

    multitune train --model minilm --data $D/sst2/train.csv --validation-data $D/sst2/dev.csv \\
        --test-data $D/sst2/dev.csv --max-examples 2000 --epochs 1 --output sst2     # the judge
    python benchmarks/sentiment_steering.py sst2 OUT [--runs ppo,grpo] [--steps 40] [-- extra flags for every run]

1. Prompts: the first 4-6 words of 200 SST-2 test sentences (seeded), OUT/prompts.jsonl.
2. Each run as a user runs it (a subprocess): ``multitune ppo`` with 32 prompts per step, ``multitune grpo`` with
   4 prompts x 8 samples, both 16 new tokens at most, the judge's P(positive) of the response alone as reward.
3. From each run's metrics.jsonl: mean reward of the first and last 5 steps, the first step >= 0.8, the KL at
   the end; the wall time of the command.

Prints a table and writes OUT/summary.json. Run it alone for the wall times to mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_own_samples import prompt_stubs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "test.csv"
MODEL = "smollm2-135m"
SHAPES = {"ppo": ["--batch-size", "32"], "grpo": ["--batch-size", "4", "--group-size", "8"]}


def summarise(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "score" in r]
    scores = [r["score"] for r in steps]
    first = next((r["step"] for r in steps if r["score"] >= 0.8), None)
    return {
        "first_5": sum(scores[:5]) / len(scores[:5]),
        "last_5": sum(scores[-5:]) / len(scores[-5:]),
        "first_step_0.8": first,
        "held_after_0.8": first is not None and min(scores[first - 1 :]) >= 0.8,
        "min_after_0.8": min(scores[first - 1 :]) if first is not None else None,
        "kl_end": steps[-1]["kl"],
        "response_length_end": steps[-1].get("response_length"),
        "scores": scores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", help="run folder of the sentiment judge (multitune train on SST-2)")
    parser.add_argument("out")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--runs", default="ppo,grpo")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tag", default="", help="suffix of the run folders (several settings side by side)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]  # after --: flags given to every run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_stubs(200, 0, TEST)))
    summary: dict = {}
    for name in args.runs.split(","):
        run = out / f"{name}{args.tag}"
        command = [sys.executable, "-m", "multitune", name, "--model", args.model, "--prompts", str(prompts),
                   "--reward-classifier", args.classifier, "--reward-label", "positive", "--steps", str(args.steps),
                   *SHAPES[name], "--max-new-tokens", "16", "--output", str(run), "--quiet", *args.extra]  # fmt: skip
        tick = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - tick
        summary[name] = {
            **summarise(run / "metrics.jsonl"),
            "wall_seconds": round(wall, 1),
            "flags": args.extra,
        }
        s = summary[name]
        print(f"{name}{args.tag}: mean reward {s['first_5']:.3f} (first 5 steps) -> {s['last_5']:.3f} (last 5); "
              f"first step >= 0.8: {s['first_step_0.8']} (held: {s['held_after_0.8']}); KL at the end "
              f"{s['kl_end']:.2f}; {wall:.0f} s", flush=True)  # fmt: skip
    (out / f"summary{args.tag}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
