"""Updates without forgetting, measured (issue 17): ``multitune train`` then ``multitune update`` per strategy.

Scenarios (real data from ../shared/datasets, MiniLM or SmolLM2-135M, CPU):

- ``data``: SST-2's training sentences in 3 shards arriving in turn (each split 80/10/10: its own validation
  and test rows); version 1 is trained on shard 1 once and copied for every strategy; each strategy updates it
  with shards 2 and 3 (``--promote always``, so each chain runs to the end; the gate's verdict is recorded).
- ``class``: Banking77's 77 intents in 3 increments (26, 26, 25 intents; ``--add-labels``); ``--dataset trec``:
  TREC's 6 question types, 2 per increment.
- ``generation``: SmolLM2-135M-Instruct, LoRA and full fine-tuning on two Alpaca shards; general-text perplexity
  (the built-in sample) of the base, after ``train`` and after ``update``.

Per strategy it prints the accuracy matrix, BWT, accuracy on every row seen so far, the final version's
accuracy on the data set's official test file, and the training seconds of the updates (the strategy's cost:
its rows, Fisher and training, not the scoring), with the ratio to ``retrain``'s. Every command runs as a
subprocess, one at a time: run the script alone on the machine for the timings to mean anything.

    python benchmarks/continual.py data --out runs/continual-data
    python benchmarks/continual.py class --out runs/continual-class
    python benchmarks/continual.py generation --out runs/continual-gen
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
STRATEGIES = ("naive", "replay", "ewc", "retrain")


def multitune(*argv: str) -> tuple[int, float, str]:
    """Run one command; (exit status, wall seconds, its output)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "multitune", *argv], capture_output=True, text=True, env={**os.environ}
    )
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):
        sys.exit(f"multitune {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.returncode, seconds, done.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def shards_data(out: Path, per_shard: int) -> tuple[list[Path], Path, list[str]]:
    rows = read_csv(DATASETS / "sst2" / "train.csv")
    random.Random(0).shuffle(rows)
    files = [
        write_csv(out / f"shard{i + 1}.csv", rows[i * per_shard : (i + 1) * per_shard]) for i in range(3)
    ]
    return files, DATASETS / "sst2" / "test.csv", ["--text-column", "sentence", "--label-column", "label"]


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [
        {k: str(v) for k, v in json.loads(line).items()} for line in path.read_text().splitlines() if line
    ]


def shards_class(out: Path, per_shard: int, dataset: str = "banking77") -> tuple[list[Path], Path, list[str]]:
    """Banking77's 77 intents (26, 26, 25 per increment) or TREC's 6 question types (2 each), shuffled."""
    if dataset == "trec":
        rows, label, text = read_jsonl(DATASETS / "trec" / "train.jsonl"), "label", "question"
        test = out / "trec-test.csv"
        write_csv(test, read_jsonl(DATASETS / "trec" / "test.jsonl"))
    else:
        rows, label, text = read_csv(DATASETS / "banking77" / "train.csv"), "category", "text"
        test = DATASETS / "banking77" / "test.csv"
    intents = sorted({r[label] for r in rows})
    random.Random(0).shuffle(intents)
    third = round(len(intents) / 3)
    groups = [intents[:third], intents[third : 2 * third], intents[2 * third :]]
    rng = random.Random(1)
    files = []
    for i, group in enumerate(groups):
        mine = [r for r in rows if r[label] in set(group)]
        rng.shuffle(mine)
        files.append(write_csv(out / f"increment{i + 1}.csv", mine[:per_shard]))
    return files, test, ["--text-column", text, "--label-column", label]


def test_accuracy(run: Path, test: Path, columns: list[str], out: Path) -> float:
    report = out / f"eval-{run.name}.json"
    multitune("eval", str(run), "--data", str(test), *columns, "--json", str(report))
    return json.loads(report.read_text())["accuracy"]


def classification(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()  # the versions record their data files' paths: absolute ones
    out.mkdir(parents=True, exist_ok=True)
    if args.scenario == "data":
        files, test, columns = shards_data(out, args.per_shard)
    else:
        files, test, columns = shards_class(out, args.per_shard, args.dataset)
    common = ["--epochs", str(args.epochs), "--max-length", "64", "--quiet", *columns]
    first = out / "version1"
    if not (first / "result.json").exists():
        shutil.rmtree(first, ignore_errors=True)
        _, seconds, _ = multitune(
            "train", "--model", "minilm", "--method", args.method, "--data", str(files[0]),
            "--output", str(first), *common,
        )  # fmt: skip
        print(f"version 1: train on {files[0].name}: {seconds:.0f} s")
    rows = []
    for strategy in args.strategies:
        run = out / strategy
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(first, run)
        steps = []
        for number, shard in enumerate(files[1:], 2):
            extra = ["--add-labels"] if args.scenario == "class" else []
            _, wall, printed = multitune(
                "update", str(run), "--data", str(shard), "--strategy", strategy, "--promote", "always",
                *extra, *args.update_args.split(), *common,
            )  # fmt: skip
            record = json.loads((run / "versions" / str(number) / "version.json").read_text())
            gate = (
                "auto gate would promote"
                if _auto_gate(record, args.max_forgetting)
                else "auto gate would refuse"
            )
            steps.append({**record, "wall": wall, "gate_auto": gate})
            print(printed.strip())
        final = test_accuracy(run, test, columns, out)
        rows.append(
            {
                "strategy": strategy,
                "steps": steps,
                "final_test": final,
                "train_seconds": sum(s["train_seconds"] for s in steps),
            }
        )
        print(f"{strategy}: final test accuracy {final:.4f}")
    _report(rows, out, args)


def _auto_gate(record: dict, max_forgetting: float) -> bool:
    bwt, gain = record.get("bwt"), record.get("gain")
    return bwt is not None and bwt >= -max_forgetting and gain is not None and gain > 0


def _report(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    retrain = next((r["train_seconds"] for r in rows if r["strategy"] == "retrain"), None)
    lines = [
        f"## {args.scenario}-incremental, {args.method}, {args.per_shard} rows per shard, {args.epochs} epochs",
        "",
        "| strategy | R after step 2 (data 1, 2) | R after step 3 (data 1, 2, 3) | BWT step 2 | BWT step 3 | "
        "all seen (step 3) | final test | update train s | vs retrain | auto gate step 2 / 3 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s2, s3 = r["steps"]
        cells = [
            r["strategy"],
            ", ".join(f"{s2['scores'][j]:.3f}" for j in sorted(s2["scores"], key=int)),
            ", ".join(f"{s3['scores'][j]:.3f}" for j in sorted(s3["scores"], key=int)),
            f"{s2['bwt']:+.2f}",
            f"{s3['bwt']:+.2f}",
            f"{s3['all_seen']:.4f}",
            f"{r['final_test']:.4f}",
            f"{r['train_seconds']:.0f} ({s2['train_seconds']:.0f} + {s3['train_seconds']:.0f})",
            f"{r['train_seconds'] / retrain:.2f}" if retrain else "-",
            f"{'yes' if _auto_gate(s2, args.max_forgetting) else 'no'} / {'yes' if _auto_gate(s3, args.max_forgetting) else 'no'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    v1 = json.loads((out / "version1" / "result.json").read_text())
    lines += ["", f"version 1 ({v1['examples']['train']} training rows): test accuracy {v1['test']['accuracy']:.4f}, "
              f"{v1['train_seconds']:.0f} s"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


def generation(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads((DATASETS / "alpaca" / "alpaca_5000.json").read_text())
    random.Random(0).shuffle(rows)
    n = args.per_shard
    shards = []
    for i in range(2):
        part = [
            {"prompt": r["instruction"], "input": r["input"], "response": r["output"]}
            for r in rows[i * n : (i + 1) * n]
        ]
        shards.append(write_csv(out / f"alpaca{i + 1}.csv", part))
    columns = ["--prompt-column", "prompt", "--input-column", "input", "--response-column", "response"]
    common = ["--epochs", "1", "--max-length", "192", "--batch-size", "8", "--quiet", *columns]
    base = _base_perplexity()
    lines = [f"## generation: SmolLM2-135M-Instruct on Alpaca ({n} rows per shard, 1 epoch); general text: built-in",
             "", f"base general-text perplexity: {base:.2f}", "",
             "| method | after train (v1) | after update (v2) | test ppl v1 data (v1 -> v2) | train s | update s | size |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in args.methods:
        run = out / method
        shutil.rmtree(run, ignore_errors=True)
        extra = ["--learning-rate", "2e-5"] if method == "full" else []
        _, train_s, _ = multitune(
            "train", "--model", "smollm2-135m", "--kind", "generation", "--method", method, "--data",
            str(shards[0]), "--output", str(run), *common, *extra,
        )  # fmt: skip
        _, update_s, printed = multitune("update", str(run), "--data", str(shards[1]), "--strategy", "naive",
                                         "--promote", "always", *common, *extra)  # fmt: skip
        print(printed.strip())
        record = json.loads((run / "versions" / "2" / "version.json").read_text())
        first = json.loads((run / "versions" / "1" / "version.json").read_text())
        general = record["general_perplexity"]
        size = (run / "versions" / "2" / "adapter.safetensors").stat().st_size
        lines.append(
            f"| {method} | {general['before']:.2f} | {general['after']:.2f} | {first['scores']['1']:.2f} -> "
            f"{record['scores']['1']:.2f} | {train_s:.0f} | {update_s:.0f} | {size / 1e6:.1f} MB |"
        )
    text = "\n".join(lines)
    print(text)
    (out / "report.md").write_text(text + "\n")


def _base_perplexity() -> float:
    from multitune.bank import MultiTaskModel
    from multitune.health.general import general_perplexity, read_general
    from multitune.models import load_base

    return general_perplexity(MultiTaskModel(load_base("smollm2-135m")), None, read_general(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("data", "class", "generation"))
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--per-shard", type=int, default=None, help="rows per shard (default: 1250 / 1040 / 200)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--dataset", choices=("banking77", "trec"), default="banking77", help="class scenario"
    )
    parser.add_argument("--update-args", default="", help="more flags for every update, e.g. '--replay 0.1'")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--max-forgetting", type=float, default=1.0)
    args = parser.parse_args()
    if args.per_shard is None:
        args.per_shard = {"data": 1250, "class": 1040, "generation": 200}[args.scenario]
    if not DATASETS.is_dir():
        sys.exit(f"{DATASETS} not found: the benchmark reads the shared data sets")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    generation(args) if args.scenario == "generation" else classification(args)


if __name__ == "__main__":
    main()
