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
