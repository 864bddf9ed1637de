"""``multitune feedback export BANK --task T --output new.csv [--preferences prefs.jsonl]``: the server's feedback
store (``BANK/monitor.sqlite``, or the ``--monitor-db`` the servers shared) as training and preference files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from multitune.cli_commands import Command
from multitune.errors import ConfigError
from multitune.health.store import STORE_FILE, FeedbackStore


def open_store(bank: str | Path, monitor_db: str | None) -> FeedbackStore:
    """The store a server over ``bank`` wrote: ``--monitor-db`` when given, else ``BANK/monitor.sqlite``, which
    must exist (an export never creates an empty store)."""
    if monitor_db:
        return FeedbackStore.open(monitor_db)
    path = Path(bank) / STORE_FILE
    if not Path(bank).is_dir():
        raise ConfigError(f"{bank} is not a folder; give the first folder `multitune serve` was started with")
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: no server has recorded feedback for {bank}; give the first folder "
            "`multitune serve` served, or --monitor-db with the database the server used"
        )
    return FeedbackStore.open(path)


def feedback_export(
    bank: str | Path,
    task: str,
    output: str | Path | None = None,
    preferences: str | Path | None = None,
    monitor_db: str | None = None,
) -> dict[str, Any]:
    """Write the task's feedback as a training file (``output``) and/or preference data (``preferences``)."""
    if output is None and preferences is None:
        raise ConfigError("give --output FILE (a training file) and/or --preferences FILE (KTO and DPO rows)")
    store = open_store(bank, monitor_db)
    try:
        rows = store.rows(task)
        summary: dict[str, Any] = {
            "feedback": len(rows),
            "without_input": sum(row["input"] is None for row in rows),
        }
        if output is not None:
            summary["rows"] = store.export(task, output)
        if preferences is not None:
            summary.update(store.export_preferences(task, preferences))
    finally:
        store.close()
    return summary


def add_feedback_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export", help="the task's feedback as a training file and/or preference data (KTO rows, DPO pairs)"
    )
    export.add_argument("bank", metavar="BANK", help="the (first) folder `multitune serve` served")
    export.add_argument("--task", required=True, help="the task whose feedback to export (its served name)")
    export.add_argument(
        "--output",
        metavar="FILE",
        help="training file: text,label rows (classification) or prompt,response rows (generation: answers "
        "rated good and corrections), as `multitune train --data` reads (.csv .tsv .json .jsonl .parquet)",
    )
    export.add_argument(
        "--preferences",
        metavar="FILE",
        help="generation tasks: KTO rows (prompt, completion, label) into FILE and, where a correction "
        "exists, DPO pairs (prompt, chosen, rejected; `multitune dpo --data`) into FILE's STEM.pairs.EXT",
    )
    export.add_argument(
        "--monitor-db",
        metavar="URL_OR_FILE",
        help="the store the server used with --monitor-db (default: BANK/monitor.sqlite)",
    )


def cmd_feedback(args: argparse.Namespace) -> None:
    summary = feedback_export(args.bank, args.task, args.output, args.preferences, args.monitor_db)
    skipped = int(summary["without_input"])
    note = f" ({skipped} without a logged input left out: serve with --log-requests)" if skipped else ""
    if args.output is not None:
        print(f"wrote {summary['rows']} rows of task '{args.task}' to {args.output}{note}", file=sys.stderr)
    if args.preferences is not None:
        pairs = f", {summary['pairs']} DPO pairs to {summary['pairs_path']}" if summary["pairs"] else ""
        print(f"wrote {summary['kto']} KTO rows to {args.preferences}{pairs}{note}", file=sys.stderr)


def commands() -> list[Command]:
    return [
        Command(
            "feedback",
            "export the serving feedback store as training or preference data",
            add_feedback_arguments,
            cmd_feedback,
        )
    ]
