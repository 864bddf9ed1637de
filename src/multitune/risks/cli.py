"""The risk commands (``multitune audit``): flags, entry points and what they print."""

from __future__ import annotations

from multitune.cli_commands import Command


def commands() -> list[Command]:
    return []
