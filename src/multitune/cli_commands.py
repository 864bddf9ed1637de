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
