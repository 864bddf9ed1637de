"""Data parallel training, measured: ``torchrun --nproc-per-node N -m multitune train`` against one process.

    python benchmarks/distributed.py [--processes 2] [--rows 800] [--epochs 1] [--method lora]

MiniLM with one SST-2 classification task (the first ``--rows`` training sentences; dev and test cut to 200
rows so evaluation does not dominate), the same command run twice in child processes: once alone with
``--batch-size 16`` and all the machine's threads, once under torchrun with ``--processes`` processes of
``threads / processes`` threads each (the same global batch: each process takes 16 / N rows of every batch).
Reported: training examples per second of each (rows x epochs over the run's own training seconds, from its
result.json), their ratio, both test accuracies, and the largest difference between the two adapters' tensors
(MiniLM trains with dropout, whose draws differ between one process and two, so the weights differ a little;
tests/training/test_distributed.py shows equality without dropout).

On the 2-core machine the ratio is near 1 at best: both runs use the same two cores, one as two threads of one
process, the other as two processes of one thread. The point here is that the split costs little; the gain
is on machines with more cores or GPUs than one process uses. Nothing else may run while it measures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "sst2"


def cut(source: Path, target: Path, rows: int) -> Path:
    with source.open() as f, target.open("w", newline="") as g:
        reader, writer = csv.reader(f), csv.writer(g)
        for i, row in enumerate(reader):
            if i > rows:
                break
            writer.writerow(row)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()
    threads = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = cut(SHARED / "train.csv", root / "train.csv", args.rows)
        dev = cut(SHARED / "dev.csv", root / "dev.csv", 200)
        test = cut(SHARED / "test.csv", root / "test.csv", 200)
        flags = ["train", "--model", "minilm", "--method", args.method, "--data", str(train), "--validation-data",
                 str(dev), "--test-data", str(test), "--epochs", str(args.epochs), "--batch-size", "16",
                 "--quiet"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        runs = {}
        one = root / "one"
        subprocess.run([sys.executable, "-m", "multitune", *flags, "--output", str(one)], check=True,
                       env={**env, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL)  # fmt: skip
        runs["1 process"] = one
        many = root / "many"
        per = max(1, threads // args.processes)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.processes), "-m", "multitune", *flags, "--output", str(many)], check=True,
                       env={**env, "OMP_NUM_THREADS": str(per)}, stdout=subprocess.DEVNULL)  # fmt: skip
        runs[f"{args.processes} processes"] = many
        speed = {}
        for name, folder in runs.items():
            result = json.loads((folder / "result.json").read_text())
            speed[name] = args.rows * args.epochs / result["train_seconds"]
            print(f"{name:<12} {result['train_seconds']:7.1f} s  {speed[name]:7.1f} examples/s  test accuracy "
                  f"{result['test']['accuracy']:.4f}")  # fmt: skip
        a = load_file(str(one / "adapter" / "adapter.safetensors"))
        b = load_file(str(many / "adapter" / "adapter.safetensors"))
        gap = max(float((a[k] - b[k]).abs().max()) for k in a)
        names = list(speed)
        print(f"ratio {names[1]} / {names[0]}: {speed[names[1]] / speed[names[0]]:.3f}; largest tensor difference "
              f"{gap:.2e} (threads: {threads} in one process, {per} per process)")  # fmt: skip


if __name__ == "__main__":
    main()
