"""One command of the CLI: its name, help, flags and entry point. Each feature package lists its own
(``commands()`` in its ``cli.py``); :mod:`multitune.cli` only puts them together."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


def add_data_file_arguments(
    parser: argparse.ArgumentParser, data_help: str, data_required: bool = True
) -> None:
    """The flags of a command that runs a saved task over a data file: ``--data``, ``--model``, ``--device``,
    ``--batch-size`` and the column flags (read back by :func:`columns_of` and :func:`device_of`)."""
    from multitune.config import DEVICE_HELP

    parser.add_argument("--data", required=data_required, help=data_help)
    parser.add_argument("--model", help="load the adapters onto this base instead of the recorded one")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    add_column_arguments(parser)


def add_column_arguments(parser: argparse.ArgumentParser) -> None:
    """``--text-column`` ... ``--response-column`` (read back by :func:`columns_of`)."""
    for name in ("text", "text-pair", "label", "prompt", "input", "response"):
        parser.add_argument(
            f"--{name}-column", help=f"column with the {name.replace('-', ' ')} (default: auto)"
        )


def add_quantize_argument(parser: argparse.ArgumentParser, default_help: str = "off") -> None:
    """``--quantize nf4|fp4|int8`` for a command that loads its base from ``--model`` by hand (the commands
    whose flags come from TrainConfig get it from there)."""
    parser.add_argument(
        "--quantize",
        choices=("nf4", "fp4", "int8"),
        help="keep the frozen base's linear layers in 4 or 8 bits (bitsandbytes); adapter methods only "
        f"(default: {default_help})",
    )


def columns_of(args: argparse.Namespace):  # noqa: ANN201  (data.Columns, imported lazily: --help stays fast)
    """The column flags of a command that reads a data file (``--text-column`` ...), as data.Columns."""
    from multitune.data import Columns

    return Columns(
        args.text_column,
        args.text_pair_column,
        args.label_column,
        args.prompt_column,
        args.input_column,
        args.response_column,
    )


def device_of(args: argparse.Namespace) -> str | None:
    """The --device given (None: auto, cuda when available); a misspelt one is a ConfigError."""
    from multitune.config import device_problem
    from multitune.errors import ConfigError

    problem = device_problem(args.device)
    if problem:
        raise ConfigError(problem)
    return None if args.device == "auto" else args.device
