"""Drift monitoring on real data: false alarms, detection delays, isolation, the label-free accuracy estimate.

    OMP_NUM_THREADS=1 python benchmarks/monitor_drift.py [--seeds 40] [--cache DIR] [--no-grid]

The reference task is MiniLM with a LoRA SST-2 task trained briefly (the first 1,000 sentences of
../shared/datasets/sst2/train.csv, 1 epoch; cached in ``--cache``), its profile built on dev.csv (872). Every
stream row is run once through the task (the serving forward's pooled vector, probabilities, token count and
unknown rate, exactly what the server hands the monitor), then streams are replayed into
:class:`multitune.health.live.TaskMonitor` in served batches of 8 rows:

- false alarms: SST-2 test sentences (1,821) in a random order per seed; alarm episodes per 1,000 requests;
- detection delay: a random 200-249 SST-2 test rows, then a switch to TREC questions, to SMS messages, or to
  only-negative SST-2 test sentences (a label-mix shift); requests after the switch until the alarm (capped
  at 1,000; a stream that already alarmed before the switch is left out and counted), and to a milder mix
  of 75% negative sentences;
- isolation: tasks A and B in one :class:`Monitor`, A switched to TREC, B fed SST-2: B's alarms, and whether
  B's checks are the same as B's monitored alone;
- the label-free estimate (mean calibrated max-probability over the window) against the true accuracy of
  the same 200 rows, on unshifted, only-negative, short-sentence and long-sentence streams (the last two a
  covariate shift, the labels still meaningful).

``--grid`` (on by default) also replays the false-alarm and delay streams under other windows and check
intervals: the evidence for live.py's defaults. Timings are not figures: nothing here is timed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitune.config import RunConfig
from multitune.data import Columns, Example, load_examples
from multitune.health.live import ALPHA, CHECK_EVERY, CLEAR, WINDOW, Monitor, TaskMonitor
from multitune.health.profile import Observed, Profile, build_profile, observe_examples

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MAX_LENGTH = 64
BATCH = 8
CAP = 1000


@dataclass
class Rows:
    """Per-row monitor inputs of one data set, and the true labels when they mean something for SST-2."""

    pooled: torch.Tensor
    probs: torch.Tensor
    lengths: list[int]
    unknown: list[float]
    gold: list[int | None]

    @classmethod
    def of(cls, seen: Observed) -> Rows:
        assert seen.pooled is not None and seen.probabilities is not None
        return cls(seen.pooled, seen.probabilities, seen.lengths, seen.unknown_rates, seen.gold)

    def take(self, index: list[int]) -> Rows:
        return Rows(
            self.pooled[index],
            self.probs[index],
            [self.lengths[i] for i in index],
            [self.unknown[i] for i in index],
            [self.gold[i] for i in index],
        )

    def __len__(self) -> int:
        return len(self.lengths)


def trained_bank(cache: Path) -> tuple[Any, str]:
    """The SST-2 LoRA task on MiniLM, trained once into ``cache`` and loaded from there afterwards."""
    from multitune.api import load
    from multitune.training.train import run

    out = cache / "sst2-lora"
    if not (out / "adapter" / "adapter.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        small = cache / "sst2-train-1000.csv"
        with (DATA / "sst2" / "train.csv").open() as f:
            rows = list(csv.reader(f))[:1001]
        with small.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        config = RunConfig(model="minilm", task="sst2", method="lora", output=str(out))
        config.data.data = str(small)
        config.data.validation_data = str(DATA / "sst2" / "dev.csv")
        config.data.test_data = str(DATA / "sst2" / "dev.csv")  # test.csv is the streams' source
        config.train.epochs, config.train.batch_size, config.train.max_length = 1, 32, MAX_LENGTH
        config.train.device = "cpu"
        summary = run(config, progress=False)
        print(f"trained: dev accuracy {summary['test'].get('accuracy', float('nan')):.3f}")
    task = load(out, device="cpu")
    return task.bank, task.task


def replay(monitor: TaskMonitor, rows: Rows, order: list[int]) -> list[int]:
    """Feed ``rows`` in ``order`` in batches of BATCH; the request counts at which a new alarm was raised."""
    raised = []
    for start in range(0, len(order), BATCH):
        part = rows.take(order[start : start + BATCH])
        before = monitor.alarms
        monitor.observe(part.pooled, part.probs, part.lengths, part.unknown)
        if monitor.alarms > before:
            raised.append(monitor.requests)
    return raised


def false_alarms(profile: Profile, test: Rows, seeds: int, options: dict[str, Any]) -> tuple[int, int]:
    """(alarm episodes, requests) over ``seeds`` random orders of the unshifted test sentences."""
    episodes = requests = 0
    for seed in range(seeds):
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed)).tolist()
        monitor = TaskMonitor(profile, seed=seed, **options)
        episodes += len(replay(monitor, test, order))
        requests += len(order)
    return episodes, requests


def delays(
    profile: Profile, test: Rows, shifted: Rows, seeds: int, options: dict[str, Any]
) -> tuple[list[int], int]:
    """(requests from the switch to the alarm per stream, streams that alarmed before the switch)."""
    found, early = [], 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        warm = 200 + int(torch.randint(0, 50, (1,), generator=g))
        before = torch.randperm(len(test), generator=g)[:warm].tolist()
        after = torch.randint(0, len(shifted), (CAP,), generator=g).tolist()
        monitor = TaskMonitor(profile, seed=seed, **options)
        if replay(monitor, test, before):
            early += 1
            continue
        raised = replay(monitor, shifted, after)
        found.append(raised[0] - warm if raised else CAP)
    return found, early


def estimate_vs_truth(
    profile: Profile, rows: Rows, seeds: int, options: dict[str, Any]
) -> tuple[float, float]:
    """(mean label-free estimate, mean true accuracy) over the full windows of random streams of ``rows``."""
    estimates, truths = [], []
    window = options.get("window", WINDOW)
    for seed in range(seeds):
        g = torch.Generator().manual_seed(2000 + seed)
        order = torch.randint(0, len(rows), (window,), generator=g).tolist()
        monitor = TaskMonitor(profile, seed=seed, **options)
        replay(monitor, rows, order)
        part = rows.take(order)
        gold = torch.tensor([-1 if g is None else g for g in part.gold])
        truths.append(float((part.probs.argmax(1) == gold).double().mean()))
        estimate = monitor.estimated_accuracy()
        assert estimate is not None
        estimates.append(estimate)
    return statistics.mean(estimates), statistics.mean(truths)


def isolation(profile: Profile, test: Rows, trec: Rows, seeds: int) -> None:
    """Tasks A and B in one Monitor, A switched to TREC after 400 requests; B's state against B alone."""
    a_alarms = b_alarms = same = 0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(3000 + seed)
        order_a = torch.randperm(len(test), generator=g)[:400].tolist()
        after = torch.randint(0, len(trec), (1200,), generator=g).tolist()
        order_b = torch.randperm(len(test), generator=g)[:1600].tolist()
        monitor, alone = Monitor({"a": profile, "b": profile}), TaskMonitor(profile)
        for start in range(0, 1600, BATCH):
            a = (
                test.take(order_a[start : start + BATCH])
                if start < 400
                else trec.take(after[start - 400 : start - 400 + BATCH])
            )
            b = test.take(order_b[start : start + BATCH])
            monitor.observe("a", a.pooled, a.probs, a.lengths, a.unknown)
            monitor.observe("b", b.pooled, b.probs, b.lengths, b.unknown)
            alone.observe(b.pooled, b.probs, b.lengths, b.unknown)
        state = monitor.state()["tasks"]
        a_alarms += state["a"]["drift"]["alarms"]
        b_alarms += state["b"]["drift"]["alarms"]
        same += state["b"]["history"] == alone.state()["history"]
    print(
        f"\nisolation ({seeds} seeds, 1,600 requests per task): task A switched to TREC after 400: {a_alarms} alarm "
        f"episodes; task B (SST-2 throughout, same monitor): {b_alarms}; B's check history identical to B "
        f"monitored alone in {same} of {seeds}"
    )


def load_rows(bank: Any, task: str, examples: list[Example], cache: Path, name: str) -> Rows:
    """The rows' monitor inputs, computed once and kept in ``cache/NAME.safetensors`` (not a pickle)."""
    from safetensors.torch import load_file, save_file

    path = cache / f"{name}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        gold = [None if g < 0 else int(g) for g in t["gold"].tolist()]
        return Rows(
            t["pooled"], t["probs"], [int(n) for n in t["lengths"].tolist()], t["unknown"].tolist(), gold
        )
    rows = Rows.of(observe_examples(bank, task, examples, MAX_LENGTH))
    save_file(
        {
            "pooled": rows.pooled.contiguous(),
            "probs": rows.probs.contiguous(),
            "lengths": torch.tensor(rows.lengths),
            "unknown": torch.tensor(rows.unknown),
            "gold": torch.tensor([-1 if g is None else g for g in rows.gold]),
        },
        str(path),
    )
    return rows


def summary(values: list[int]) -> str:
    if not values:
        return "n/a"
    missed = sum(v >= CAP for v in values)
    return (
        f"median {statistics.median(values):.0f}, p90 {sorted(values)[int(0.9 * (len(values) - 1))]}, "
        f"max {max(values)}" + (f", {missed} not detected within {CAP}" if missed else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40, help="unshifted streams (default: 40)")
    parser.add_argument("--delay-seeds", type=int, default=20, help="streams per shift (default: 20)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "multitune-monitor-drift"))
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    bank, task = trained_bank(Path(args.cache))
    sst = Columns(text="sentence", label="label")
    dev = load_examples(DATA / "sst2" / "dev.csv", "classification", sst)
    profile = build_profile(bank, task, dev, MAX_LENGTH)
    print(
        f"profile: {profile.rows} dev rows, features {tuple(profile.features.shape)}, temperature "
        f"{profile.temperature:.3f}, dev accuracy {profile.accuracy:.3f}, estimated {profile.estimated_accuracy:.3f}"
    )
    test_examples = load_examples(DATA / "sst2" / "test.csv", "classification", sst)
    cache = Path(args.cache)
    test = load_rows(bank, task, test_examples, cache, "sst2-test")
    trec = load_rows(
        bank,
        task,
        load_examples(DATA / "trec" / "test.jsonl", "classification", Columns(text="question")),
        cache,
        "trec-test",
    )
    sms_all = load_examples(
        DATA / "sms_spam" / "SMSSpamCollection.tsv", "classification", Columns(text="SMS", label="Label")
    )
    sms = load_rows(bank, task, [Example(text=e.text) for e in sms_all[:1000]], cache, "sms-1000")
    negative = test.take([i for i, ex in enumerate(test_examples) if ex.label == "negative"])
    by_length = sorted(range(len(test)), key=lambda i: test.lengths[i])
    third = len(by_length) // 3
    short, long = test.take(by_length[:third]), test.take(by_length[-third:])

    positives = [i for i, ex in enumerate(test_examples) if ex.label == "positive"]
    mild = test.take([i for i, ex in enumerate(test_examples) if ex.label == "negative"] + positives[::3])
    defaults = {"window": WINDOW, "check_every": CHECK_EVERY}
    settings = [defaults]
    if args.grid:
        grid = [{"window": w, "check_every": c} for w in (100, 200) for c in (25, 50)]
        settings += [options for options in grid if options != defaults]
    for options in settings:
        episodes, requests = false_alarms(profile, test, args.seeds, options)
        print(
            f"\n== window {options['window']}, check every {options['check_every']} (alpha {ALPHA}, clear {CLEAR})"
            + (" (the defaults)" if options == defaults else "")
        )
        print(
            f"false alarms, unshifted SST-2 test streams: {episodes} episodes in {requests:,} requests "
            f"({1000 * episodes / requests:.3f} per 1,000; {args.seeds} seeds)"
        )
        for name, shifted in (
            ("TREC", trec),
            ("SMS", sms),
            ("only-negative", negative),
            ("75% negative", mild),
        ):
            found, early = delays(profile, test, shifted, args.delay_seeds, options)
            note = f" ({early} streams alarmed before the switch)" if early else ""
            print(f"delay after a switch to {name}: {summary(found)} requests{note}")

    isolation(profile, test, trec, 10)
    print(f"\nlabel-free estimate vs true accuracy (window of {WINDOW}, mean over 20 windows):")
    for name, rows in (
        ("unshifted", test),
        ("only-negative (label shift)", negative),
        ("short sentences", short),
        ("long sentences", long),
    ):
        estimate, truth = estimate_vs_truth(profile, rows, 20, {})
        print(
            f"  {name:<28} estimated {estimate:.3f}  true {truth:.3f}  difference {100 * (estimate - truth):+.1f} points"
        )


if __name__ == "__main__":
    main()
