"""SST-2 test accuracy of MiniLM with full fine-tuning and with LoRA, same data, same budget.

    python benchmarks/sst2_accuracy.py [--epochs 2] [--methods full,lora] [--out runs/bench-sst2]

Trains on ../shared/datasets/sst2/train.csv (6,920 sentences), early-stops on dev.csv (872), scores
test.csv (1,821), and prints one row per method plus the LoRA - full difference in points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from methods_sst2 import SST2, sst2_config, timed_run  # the sibling script: one SST-2 setup

from multitune.methods.lora import LoRAConfig

LEARNING_RATES = {"full": 5e-5, "lora": 1e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--out", default="runs/bench-sst2")
    parser.add_argument("--lora-targets", default="all-linear")
    parser.add_argument("--lora-lr", type=float, default=LEARNING_RATES["lora"])
    args = parser.parse_args()
    if not SST2.exists():
        raise SystemExit(f"{SST2} not found: this benchmark needs ../shared/datasets/sst2")
    rows = {}
    for method in args.methods.split(","):
        lr = args.lora_lr if method == "lora" else LEARNING_RATES[method]
        config = sst2_config(method, Path(args.out) / method, args.epochs, lr)
        if method == "lora":
            config.methods["lora"] = LoRAConfig(target_modules=args.lora_targets.split(","))
        rows[method] = summary = timed_run(config)
        print(
            json.dumps(
                {
                    "method": method,
                    "test": summary["test"],
                    "validation": summary["validation"],
                    "trainable": summary["trainable_parameters"],
                    "train_s": summary["train_seconds"],
                    "wall_s": summary["wall_seconds"],
                }
            ),
            flush=True,
        )
    print("\n| method | trainable params | train s | dev acc (best) | test acc | test macro-F1 |")
    print("|---|---|---|---|---|---|")
    for method, s in rows.items():
        print(
            f"| {method} | {s['trainable_parameters']:,} | {s['train_seconds']:.0f} | "
            f"{s['validation']['accuracy']:.4f} | {s['test']['accuracy']:.4f} | {s['test']['macro_f1']:.4f} |"
        )
    if {"full", "lora"} <= rows.keys():
        gap = 100 * (rows["lora"]["test"]["accuracy"] - rows["full"]["test"]["accuracy"])
        print(f"\nLoRA - full fine-tuning: {gap:+.2f} accuracy points on the SST-2 test split")


if __name__ == "__main__":
    main()
