"""The composition commands (``multitune merge``): flags, entry point and what they print (the work is in
:mod:`multitune.compose.run`)."""

from __future__ import annotations

import argparse

from multitune.cli_commands import Command, add_column_arguments, device_of
from multitune.compose.merge import MERGE_METHODS
from multitune.errors import ConfigError


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, one per task (got '{text}')") from None


def _named_files(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for value in values or []:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"{flag} takes NAME=FILE (got '{value}')")
        out[name] = file
    return out


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    from multitune.config import DEVICE_HELP

    parser.add_argument(
        "tasks", nargs="+", help="two or more run or adapter folders of LoRA (or (IA)^3) tasks"
    )
    parser.add_argument("--output", required=True, help="the bank to write: one run folder per task")
    parser.add_argument(
        "--method", default="ties", choices=MERGE_METHODS,
        help="cat (exact, rank = sum), linear (PEFT's factor average, equal ranks), svd, ties, dare_linear, "
        "dare_ties (default: ties)",
    )  # fmt: skip
    parser.add_argument("--weights", help="one weight per task, comma-separated (default: 1 each)")
    parser.add_argument(
        "--density", type=float, default=0.5,
        help="ties/dare: the share of each task vector kept, in (0, 1] (default: 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--rank", type=int, help="svd/ties/dare: the merged rank (default: the largest task's rank)"
    )
    parser.add_argument("--names", help="the merged tasks' names, comma-separated (default: their own)")
    parser.add_argument(
        "--search", type=int, default=0, metavar="N",
        help="choose weights (and density) by N Optuna trials on each task's validation split",
    )  # fmt: skip
    parser.add_argument(
        "--test", action="append", metavar="NAME=FILE",
        help="score task NAME on FILE instead of its kept test split (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--validation", action="append", metavar="NAME=FILE",
        help="--search scores task NAME on FILE instead of its kept validation split (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-score", action="store_true", help="write the merge without the retention table")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of dare's drops and of --search (default: 0)"
    )
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")


def cmd_merge(args: argparse.Namespace) -> None:
    from multitune.compose.merge import MergeSettings
    from multitune.compose.run import merge_tasks, retention_lines

    if args.search < 0:
        raise ConfigError(f"--search takes a number of trials, 0 or more (got {args.search})")
    settings = MergeSettings(
        args.method, _floats(args.weights, "--weights"), args.density, args.rank, args.seed
    )
    names = args.names.split(",") if args.names else None
    record = merge_tasks(
        args.tasks, settings, args.output, names, _named_files(args.test, "--test"),
        _named_files(args.validation, "--validation"), args.search, not args.no_score, device_of(args),
        args.batch_size,
    )  # fmt: skip
    weights = ", ".join(f"{t['name']} {w:g}" for t, w in zip(record["tasks"], record["weights"], strict=True))
    density = f", density {record['density']:g}" if record["density"] is not None else ""
    print(f"merged {len(record['tasks'])} tasks with {record['method']} (weights {weights}{density})")
    for line in retention_lines(record):
        print(line)
    print(f"bank: {args.output} (one run folder per task; merge.json)")


def add_compose_arguments(parser: argparse.ArgumentParser) -> None:
    from multitune.config import DEVICE_HELP

    parser.add_argument(
        "--from", dest="sources", required=True,
        help="the LoRA tasks to weigh: run or adapter folders, comma-separated",
    )  # fmt: skip
    parser.add_argument("--data", required=True, help="the new task's few labelled examples (5-50 rows)")
    parser.add_argument("--output", required=True, help="the run folder to write")
    parser.add_argument(
        "--test-data", help="held-out rows: the composed task and the bare base scored on them"
    )
    parser.add_argument("--trials", type=int, default=40, help="Optuna TPE trials (default: 40)")
    parser.add_argument(
        "--l1", type=float, default=0.05, help="LoraHub's L1 penalty on the weights (default: 0.05)"
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=4,
        help="classification: folds of the head's cross-validation (default: 4)",
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search and the folds (default: 0)")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    add_column_arguments(parser)


def cmd_compose(args: argparse.Namespace) -> None:
    from multitune.cli_commands import columns_of
    from multitune.compose.lorahub import compose, compose_lines

    sources = [s for s in args.sources.split(",") if s]
    record = compose(
        sources, args.data, args.output, args.test_data, columns_of(args), args.trials, args.l1, args.folds,
        args.seed, device_of(args), args.max_length,
    )  # fmt: skip
    for line in compose_lines(record):
        print(line)
    print(f"run: {args.output} (adapter/, result.json)")


def commands() -> list[Command]:
    return [
        Command(
            "merge",
            "merge LoRA or (IA)^3 tasks of one base into one body (cat, linear, svd, ties, dare); retention table",
            add_merge_arguments,
            cmd_merge,
        ),
        Command(
            "compose",
            "a new task from a few examples as weights of existing LoRA tasks (LoraHub's gradient-free search)",
            add_compose_arguments,
            cmd_compose,
        ),
    ]
