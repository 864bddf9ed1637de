"""``multitune update``, ``versions``, ``promote`` and ``rollback``: flags, entry points and what they print
(the work is in :mod:`multitune.health.update` and :mod:`multitune.health.versions`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from multitune.cli_commands import Command
from multitune.errors import ConfigError

FEEDBACK = "feedback:"  # --data feedback:BANK: the rows the server's feedback store holds for --task


def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    from multitune.config import DataConfig, TrainConfig
    from multitune.flags import add_arguments
    from multitune.health.update import UpdateConfig

    parser.add_argument(
        "task_dir", help="the task: a run folder of 'multitune train' or a bank's task folder"
    )
    parser.add_argument(
        "--task",
        help="with --data feedback:BANK, the served task whose feedback to learn from (default: TASK_DIR's)",
    )
    parser.add_argument("--monitor-db", help="with --data feedback:BANK, the database the servers shared")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(parser, UpdateConfig, dest_prefix="update.")
    add_arguments(parser, DataConfig, dest_prefix="data.")
    add_arguments(parser, TrainConfig, dest_prefix="train.")


def _section(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {
        k.removeprefix(prefix): v for k, v in vars(args).items() if k.startswith(prefix) and v is not None
    }


def _feedback_data(source: str, task: str, monitor_db: str | None, into: Path) -> str:
    """Export the feedback store's labelled rows of ``task`` to ``into/versions/feedback/TASK-TIME.csv``."""
    from multitune.health.feedback_cli import open_store
    from multitune.health.versions import VERSIONS

    store = open_store(source.removeprefix(FEEDBACK), monitor_db)
    try:
        path = into / VERSIONS / "feedback" / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = store.export(task, path)
    finally:
        store.close()
    if not rows:
        raise ConfigError(
            f"the feedback store holds no labelled rows for task '{task}'; nothing to learn from"
        )
    return str(path)


def cmd_update(args: argparse.Namespace) -> None:
    from multitune.config import DataConfig, RunConfig, TrainConfig, validate
    from multitune.health.update import NOT_PROMOTED, UpdateConfig, update
    from multitune.health.versions import current_version, task_root, version_adapter
    from multitune.storage import read_adapter_config

    upd = UpdateConfig(**_section(args, "update."))
    data = DataConfig(**_section(args, "data."))
    overrides = _section(args, "train.")
    root = task_root(args.task_dir)
    meta = read_adapter_config(version_adapter(root, current_version(root)))
    validate(
        RunConfig(
            kind=meta["task"]["kind"], task=meta["task"]["name"], data=data, train=TrainConfig(**overrides)
        )
    )
    if data.data and data.data.startswith(FEEDBACK):  # kept in the task folder: retrain reads it again later
        data.data = _feedback_data(data.data, args.task or meta["task"]["name"], args.monitor_db, root)
    device = overrides.get("device")
    record = update(root, upd, data, overrides, None if device in (None, "auto") else device, not args.quiet)
    _print_update(root, record)
    if not record["gate"]["promoted"]:
        sys.exit(NOT_PROMOTED)


def _fmt(kind: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if kind == "classification" else f"{value:.3f}"


def _print_matrix(kind: str, matrix: dict[str, dict[str, float]]) -> None:
    columns = sorted({int(j) for row in matrix.values() for j in row})
    metric = "accuracy" if kind == "classification" else "perplexity"
    print(f"{metric} of each version (rows) on each version's test data (columns):")
    print("  version " + "".join(f"{'data ' + str(j):>10}" for j in columns))
    for i in sorted(matrix, key=int):
        print(f"  {i:>7} " + "".join(f"{_fmt(kind, matrix[i].get(str(j))):>10}" for j in columns))


def _print_update(root: Path, record: dict[str, Any]) -> None:
    kind = record["kind"]
    n, parent = record["version"], record["parent"]
    ex = record["examples"]
    print(
        f"version {n} of {root} ({record['strategy']} from version {parent}): trained on {ex['trained_on']:,} rows "
        f"({ex['train']:,} new, {ex['replayed']:,} replayed), {record['steps']} steps, {record['train_seconds']:.1f} s, "
        f"{record['size_bytes']:,} bytes"
    )
    _print_matrix(kind, record["matrix"])
    bwt, gain = record["bwt"], record["gain"]
    print(
        "backward transfer (BWT): "
        + ("-" if bwt is None else f"{bwt:+.2f} points")
        + "; on the new data: "
        + ("-" if gain is None else f"{gain:+.2f} points")
        + f" against version {parent}"
    )
    golden = record.get("golden")
    if golden:
        print(
            f"golden set ({golden['rows']} rows): {golden['metric']} {golden['before']:.4f} -> {golden['after']:.4f} "
            f"({golden['change']:+.2f} points; the gate allows -{golden['max_drop']:g})"
        )
    general = record.get("general_perplexity")
    if general:
        print(f"general-text perplexity: {general['before']:.2f} before, {general['after']:.2f} after")
    if record.get("problem"):
        print(f"warning: {record['problem']}")
    if record["gate"]["promoted"]:
        print(f"promoted: version {n} is current ({record['gate']['reason']})")
    else:
        print(
            f"not promoted: {record['gate']['reason']}; version {parent} stays current. "
            f"Promote it anyway with: multitune promote {root} {n}"
        )


def add_versions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task_dir", help="the task: a run folder of 'multitune train' or a bank's task folder"
    )
    parser.add_argument("--json", action="store_true", help="print the versions as JSON")


def versions_table(root: Path) -> list[dict[str, Any]]:
    """One row per version: number, current, parent, strategy, data, rows, scores, BWT, size, date."""
    from multitune.health.update import records_of
    from multitune.health.versions import current_version, folder_bytes, version_adapter
    from multitune.storage import read_adapter_config

    current = current_version(root)
    kind = read_adapter_config(version_adapter(root, current))["task"]["kind"]
    rows = []
    for n, record in sorted(records_of(root, kind).items()):
        data = record.get("data")
        rows.append(
            {
                "version": n,
                "current": n == current,
                "parent": record.get("parent"),
                "strategy": record.get("strategy"),
                "data": data.get("data") if isinstance(data, dict) else None,
                "examples": (record.get("examples") or {}).get("train"),
                "scores": record.get("scores") or {},
                "bwt": record.get("bwt"),
                "promoted": record.get("promoted", []),
                "size_bytes": folder_bytes(version_adapter(root, n)),
                "date": record.get("date"),
                "adapter": str(version_adapter(root, n)),
                "kind": kind,
            }
        )
    return rows


def cmd_versions(args: argparse.Namespace) -> None:
    from multitune.health.versions import task_root

    root = task_root(args.task_dir)
    rows = versions_table(root)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    metric = "accuracy" if rows[0]["kind"] == "classification" else "perplexity"
    print(f"versions of {root} ({metric} on each version's test data; * = current):")
    for row in rows:
        scores = ", ".join(
            f"data {j} {_fmt(row['kind'], v)}"
            for j, v in sorted(row["scores"].items(), key=lambda x: int(x[0]))
        )
        bwt = "" if row["bwt"] is None else f", BWT {row['bwt']:+.2f}"
        origin = "" if row["parent"] is None else f" from {row['parent']}"
        print(
            f"{'*' if row['current'] else ' '} {row['version']:>3}  {row['strategy'] or '-'}{origin}  "
            f"data {row['data'] or '-'} ({row['examples'] if row['examples'] is not None else '?'} rows)  "
            f"{scores or 'not scored'}{bwt}  {row['size_bytes']:,} bytes  {row['date'] or ''}"
        )


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task_dir", help="the task: a run folder of 'multitune train' or a bank's task folder"
    )
    parser.add_argument("version", type=int, help="the version to make current")


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task_dir", help="the task: a run folder of 'multitune train' or a bank's task folder"
    )
    parser.add_argument(
        "--to", type=int, help="the version to go back to (default: the one the current replaced)"
    )


def switch(task_dir: str | Path, number: int | None, command: str) -> tuple[Path, int, int]:
    """Make ``number`` (None: the current version's parent) current under the task's lock; (root, old, new)."""
    from multitune.health.update import records_of
    from multitune.health.versions import current_version, set_current, task_root, version_adapter
    from multitune.storage import output_lock, read_adapter_config

    root = task_root(task_dir)
    with output_lock(root, f"multitune {command}"):
        old = current_version(root)
        if number is None:
            kind = read_adapter_config(version_adapter(root, old))["task"]["kind"]
            number = records_of(root, kind)[old].get("parent")
            if number is None:
                raise ConfigError(
                    f"version {old} of {root} is its first: there is nothing to roll back to "
                    f"(multitune versions {root} lists them)"
                )
        set_current(root, number)
    return root, old, number


def cmd_promote(args: argparse.Namespace) -> None:
    root, old, new = switch(args.task_dir, args.version, "promote")
    print(f"{root}: version {new} is current (was {old}); running servers pick it up within seconds")


def cmd_rollback(args: argparse.Namespace) -> None:
    root, old, new = switch(args.task_dir, args.to, "rollback")
    print(f"{root}: rolled back to version {new} (was {old}); running servers pick it up within seconds")


def commands() -> list[Command]:
    return [
        Command(
            "update",
            "continue a task on new data as its next version; forgetting measured; promoted through a gate",
            add_update_arguments,
            cmd_update,
        ),
        Command(
            "versions",
            "list a task's versions: data, strategy, scores, BWT, size, date",
            add_versions_arguments,
            cmd_versions,
        ),
        Command(
            "promote",
            "make a version of a task current (a server picks it up)",
            add_promote_arguments,
            cmd_promote,
        ),
        Command("rollback", "go back to an earlier version of a task", add_rollback_arguments, cmd_rollback),
    ]
