"""``multitune profile RUN --data FILE`` and ``multitune monitor RUN_OR_BANK --data new.csv``: flags and entry
points (the work is in :mod:`multitune.health.offline`)."""

from __future__ import annotations

import argparse

from multitune.cli_commands import Command, add_data_file_arguments, columns_of, device_of
from multitune.errors import ConfigError


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder of 'multitune train', or one task's adapter folder")
    add_data_file_arguments(
        parser,
        "the task's validation data (.csv .tsv .json .jsonl .parquet); labelled rows calibrate the "
        "accuracy estimate",
    )
    parser.add_argument("--max-length", type=int, help="tokens per input (default: the run's own)")


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="run folder, adapter folder, bank (BANK/TASK/adapter.json) or folder of run folders"
    )
    add_data_file_arguments(
        parser, "file of new inputs to compare with each task's reference (labels optional)"
    )
    parser.add_argument(
        "--output", help="folder for report.json and report.html (default: monitor-report beside --data)"
    )


def cmd_profile(args: argparse.Namespace) -> None:
    from multitune.health.offline import build_missing_profile

    if args.max_length is not None and args.max_length < 1:
        raise ConfigError("--max-length must be a positive number of tokens")
    name, adapter, profile = build_missing_profile(
        args.run, args.data, columns_of(args), args.model, device_of(args), args.max_length, args.batch_size
    )
    accuracy = f", reference accuracy {profile.accuracy:.3f}" if profile.accuracy is not None else ""
    print(
        f"profile of task '{name}' built from {profile.rows} rows of {args.data}{accuracy}; "
        f"temperature {profile.temperature:.3f}; written to {adapter}"
    )


def cmd_monitor(args: argparse.Namespace) -> None:
    from multitune.health.offline import monitor_file, summary_line

    report = monitor_file(
        args.run, args.data, args.output, columns_of(args), args.model, device_of(args), args.batch_size
    )
    for name, task in report["tasks"].items():
        print(summary_line(name, task))
    print(f"report: {report['output']}/report.html (and report.json)")


def commands() -> list[Command]:
    return [
        Command(
            "profile",
            "build the drift profile of a task trained before profiles existed",
            add_profile_arguments,
            cmd_profile,
        ),
        Command(
            "monitor",
            "compare a file of new inputs with each task's reference: drift report (HTML + JSON)",
            add_monitor_arguments,
            cmd_monitor,
        ),
    ]
