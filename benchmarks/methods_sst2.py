"""Every method on SST-2 with MiniLM, the same budget for each: trainable parameters, time, dev accuracy.

    python benchmarks/methods_sst2.py [--train 2000] [--epochs 2] [--methods lora,prefix,...] [--out runs/bench-methods]

Each method trains on the same first ``--train`` sentences of ../shared/datasets/sst2/train.csv for the
same epochs, batch size and length, early-stops on dev.csv (872) and is scored on dev and test.csv
(1,821). Learning rates are each method's usual order of magnitude (one value, no search: the search
is the compare command's job). ``prompting`` trains nothing (zero-shot by label prototypes on an encoder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from multitune.config import RunConfig
from multitune.methods import METHODS
from multitune.training.train import run

SST2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2"
LEARNING_RATES = {
    "full": 5e-5,
    "lora": 2e-3,
    "prefix": 1e-2,
    "adapter": 2e-3,
    "ia3": 1e-2,
    "prompt": 1e-2,
    "prompting": 0.0,
}


def sst2_config(method: str, out: Path, epochs: int, learning_rate: float | None) -> RunConfig:
    """MiniLM on SST-2 (train.csv, early stopping on dev.csv, scored on test.csv), batch 32, 64 tokens, CPU."""
    config = RunConfig(model="minilm", task="sst2", method=method, output=str(out))
    config.data.data = str(SST2 / "train.csv")
    config.data.validation_data = str(SST2 / "dev.csv")
    config.data.test_data = str(SST2 / "test.csv")
    config.train.epochs, config.train.batch_size, config.train.max_length = epochs, 32, 64
    config.train.learning_rate = learning_rate
    config.train.device = "cpu"
    return config


def timed_run(config: RunConfig) -> dict:
    """``run`` in a fresh output folder; the summary gains ``wall_seconds``."""
    shutil.rmtree(config.output, ignore_errors=True)
    start = time.perf_counter()
    summary = run(config, progress=False)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training sentences (default: 2000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(LEARNING_RATES))
    parser.add_argument("--out", default="runs/bench-methods")
    args = parser.parse_args()
    if not SST2.exists():
        raise SystemExit(f"{SST2} not found: this benchmark needs ../shared/datasets/sst2")
    rows = {}
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method}; known: {', '.join(sorted(METHODS))}")
        config = sst2_config(method, Path(args.out) / method, args.epochs, LEARNING_RATES.get(method) or None)
        config.data.max_examples = args.train
        rows[method] = summary = timed_run(config)
        print(
            json.dumps(
                {
                    "method": method,
                    "dev": summary["validation"],
                    "test": summary["test"],
                    "trainable": summary["trainable_parameters"],
                    "train_s": summary["train_seconds"],
                    "wall_s": summary["wall_seconds"],
                }
            ),
            flush=True,
        )
    print(f"\nMiniLM on SST-2: {args.train} training sentences, {args.epochs} epochs, batch 32, 64 tokens\n")
    print("| method | trainable params | train s | dev acc | test acc | test macro-F1 |")
    print("|---|---|---|---|---|---|")
    for method, s in rows.items():
        print(
            f"| {method} | {s['trainable_parameters']:,} | {s['train_seconds']:.0f} | "
            f"{s['validation']['accuracy']:.4f} | {s['test']['accuracy']:.4f} | {s['test']['macro_f1']:.4f} |"
        )


if __name__ == "__main__":
    main()
