"""A spam task stacked on an SMS domain adapter vs the same task without it (``train --stack-on``).

    python benchmarks/domain_sms.py split OUT           # OUT/domain.txt, OUT/labelled.jsonl, OUT/test.jsonl
    multitune train --kind domain --data OUT/domain.txt --model minilm --method lora --epochs 1 \\
        --batch-size 32 --eval-every 50 --output OUT/mlm          # (docs/composition.md)
    python benchmarks/stack_sms.py OUT OUT/mlm [--shots 100] [--seeds 3] [--methods lora,base]

For each seed, ``shots`` labelled pool messages (class-balanced: shots/2 spam, shots/2 ham) are the whole
labelled data of a user with little of it: ``multitune train`` splits them 0.9/0.1 into train and validation
(its default ratios with a test file given) and is scored on the 1,114 held-out test messages. Each method
runs twice on the same messages, seed and settings: stacked on the domain run (``--stack-on``) and on the
bare base. Prints per-seed test accuracy with its 95% bootstrap interval and macro-F1, and the mean ± sample
standard deviation over the seeds; writes OUT/stack.json. Run it alone for the wall times to mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def few(out: Path, shots: int, seed: int) -> Path:
    rows = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    chosen = []
    for label in sorted({r["label"] for r in rows}):
        pool = [r for r in rows if r["label"] == label]
        chosen += rng.sample(pool, shots // 2)
    rng.shuffle(chosen)
    path = out / f"few-{shots}-{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path


def one(out: Path, data: Path, method: str, seed: int, stack_on: str | None, epochs: int) -> dict:
    from multitune.config import DataConfig, RunConfig, TrainConfig
    from multitune.training.train import run

    name = f"{method}-{'stacked' if stack_on else 'plain'}-{seed}"
    folder = out / "stack" / name
    config = RunConfig(
        model="minilm",
        method=method,
        stack_on=stack_on,
        output=str(folder),
        data=DataConfig(data=str(data), test_data=str(out / "test.jsonl"), split=[0.9, 0.1, 0.0]),
        train=TrainConfig(epochs=epochs, seed=seed, device="cpu"),
    )
    start = time.perf_counter()
    summary = run(config, progress=False)
    seconds = time.perf_counter() - start
    import multitune

    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    predicted = multitune.load(folder, device="cpu").predict([r["text"] for r in test])
    return {
        "correct": [int(p == r["label"]) for p, r in zip(predicted, test, strict=True)],
        "run": name,
        "method": method,
        "stacked": stack_on is not None,
        "seed": seed,
        "test": summary["test"],
        "learned": summary["learned"],
        "trainable": summary["trainable_parameters"],
        "seconds": round(seconds, 1),
    }


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("domain")
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="lora")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    from multitune.metrics import bootstrap_interval

    rows = []
    for seed in range(args.seeds):
        data = few(args.out, args.shots, seed)
        for method in args.methods.split(","):
            for stack_on in (args.domain, None):
                row = one(args.out, data, method, seed, stack_on, args.epochs)
                test = row["test"]
                low, high = bootstrap_interval(row["correct"], 2000, seed=0)
                print(
                    f"{row['run']:>22}  accuracy {test['accuracy']:.4f} [{low:.4f}, {high:.4f}]  macro-F1 "
                    f"{test['macro_f1']:.4f}  learned {row['learned']}  {row['seconds']} s",
                    flush=True,
                )
                rows.append(row)
            stacked, plain = rows[-2]["correct"], rows[-1]["correct"]
            diff = [a - b for a, b in zip(stacked, plain, strict=True)]
            low, high = bootstrap_interval(diff, 2000, seed=0)
            print(
                f"{'':>22}  stacked - plain: {statistics.mean(diff):+.4f} [{low:+.4f}, {high:+.4f}] (paired)"
            )
    print()
    for method in args.methods.split(","):
        for stacked in (True, False):
            got = [r["test"] for r in rows if r["method"] == method and r["stacked"] == stacked]
            acc = [t["accuracy"] for t in got]
            f1 = [t["macro_f1"] for t in got]
            print(
                f"{method} {'stacked on the domain adapter' if stacked else 'on the bare base':>30}: accuracy "
                f"{statistics.mean(acc):.4f} ± {spread(acc):.4f}, macro-F1 {statistics.mean(f1):.4f} ± "
                f"{spread(f1):.4f} over {len(got)} seeds"
            )
    (args.out / "stack.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
