"""Preference data: pairs of responses to one prompt, and prompt files for PPO.

A file of (prompt, chosen, rejected) rows, or Anthropic HH rows whose ``chosen`` and ``rejected`` are whole
dialogues (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``); those are split into the shared prompt (up to and
including the last ``"\\n\\nAssistant:"``) and the two responses. Errors name the row (a JSON Lines file's
line) and the fix.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from multitune.config import plural
from multitune.errors import ConfigError, DataError
from multitune.tables import read_table, shown

R = TypeVar("R")  # a row of preference data: a Pair, or KTO's Unpaired
ASSISTANT = "\n\nAssistant:"  # the HH turn marker the prompt ends with


@dataclass(frozen=True)
class Pair:
    """One preference: two responses to ``prompt``, ``chosen`` preferred over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str


# ---- data ---------------------------------------------------------------------------------------------
def split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of two HH dialogues, or None when they share no prompt.

    The prompt ends at the last ``"\\n\\nAssistant:"`` of each. A few real HH rows (5 of the 2312 of
    harmless-base test) diverge at an earlier assistant turn, with an extra turn inside one response;
    their prompt is then the dialogue up to the last assistant turn before they diverge, which is the
    same split whenever the last-turn prompts agree.
    """
    c, r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if c >= 0 and r >= 0 and chosen[:c] == rejected[:r]:
        end = c + len(ASSISTANT)
        return chosen[:end], chosen[end:], rejected[r + len(ASSISTANT) :]
    at = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
    if at < 0:
        return None
    end = at + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _line_numbers(path: Path, count: int) -> tuple[str, list[int]]:
    """How rows are named in messages: by their line in a JSON Lines file (blank lines skipped), else by row."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        lines = [
            n for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1) if line.strip()
        ]
        if len(lines) == count:
            return "line", lines
    return "row", list(range(1, count + 1))


def _text(value: object, where: str, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, list | dict):
        raise DataError(
            f"{where}: '{key}' holds a {'list' if isinstance(value, list) else 'object'}, not text; "
            "conversational (message-list) pairs are not supported, give the texts"
        )
    return str(value)


def load_pairs(path: str | Path, drop_empty: bool = False) -> list[Pair]:
    """Preference pairs from a .jsonl/.json/.csv/.tsv/.parquet file.

    Each row has ``prompt``, ``chosen`` and ``rejected`` (the responses alone), or only ``chosen`` and
    ``rejected`` as whole HH dialogues (see :func:`split_dialogues`). Rows with an empty chosen or
    rejected response raise :class:`DataError` naming them, unless ``drop_empty`` drops them (4 rows of
    the HH harmless-base test file have an empty chosen response).
    """
    path = Path(path)
    rows = read_table(path)  # missing file, bad JSON line (by number), wrong format: DataError
    unit, numbers = _line_numbers(path, len(rows))
    pairs: list[Pair] = []
    missing: dict[str, list[int]] = {}
    empty: list[int] = []
    for row, number in zip(rows, numbers, strict=True):
        where = f"{unit} {number} of {path}"
        absent = [k for k in ("chosen", "rejected") if k not in row]
        if absent:
            missing.setdefault("', '".join(absent), []).append(number)
            continue
        chosen, rejected = _text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")
        if "prompt" in row:
            pair = Pair(_text(row["prompt"], where, "prompt"), chosen, rejected)
        else:
            parts = split_dialogues(chosen, rejected)
            if parts is None:
                raise DataError(
                    f"{where}: 'chosen' and 'rejected' share no prompt ending in an "
                    f"{ASSISTANT.strip()!r} turn; HH rows must be two continuations of one "
                    "dialogue, or give a 'prompt' column with the responses alone"
                )
            pair = Pair(*parts)
        if not pair.chosen.strip() or not pair.rejected.strip():
            empty.append(number)
        else:
            pairs.append(pair)
    if missing:
        keys, numbers_ = next(iter(missing.items()))
        first = rows[numbers.index(numbers_[0])]
        count = sum(map(len, missing.values()))
        more = f" (and {plural(count - 1, unit)} more)" if count > 1 else ""
        raise DataError(
            f"{unit} {numbers_[0]} of {path} lacks '{keys}'{more}; each row needs 'prompt', 'chosen' "
            f"and 'rejected', or HH dialogues in 'chosen' and 'rejected' (its keys: "
            f"{', '.join(first) or 'none'})"
        )
    if empty and not drop_empty:
        raise DataError(
            f"{path}: {plural(len(empty), unit)} with an empty chosen or rejected response "
            f"({unit} {shown(empty)}); remove them or pass --drop-empty"
        )
    if not pairs:
        raise DataError(f"{path}: every pair has an empty chosen or rejected response; fill them in")
    return pairs


def load_prompts(path: str | Path) -> list[str]:
    """Prompts for PPO: a ``prompt`` (or ``text``) column, the prompts of a pairs file, or .txt lines.

    Files with ``chosen``/``rejected`` and no ``prompt`` are read as pairs (:func:`load_pairs`, empty
    responses dropped), so an HH file gives its dialogue prompts.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path} does not exist; check the path")
        prompts = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"{path} has no prompts; write one prompt per line")
        return prompts
    rows = read_table(path)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    column = next((k for k in ("prompt", "text") if k in keys), None)
    if column is None:
        if "chosen" in keys and "rejected" in keys:
            return [p.prompt for p in load_pairs(path, drop_empty=True)]
        raise DataError(
            f"{path} has no 'prompt' or 'text' column (columns: {', '.join(keys)}); give one prompt "
            "per row under 'prompt', or a file of chosen/rejected pairs"
        )
    unit, numbers = _line_numbers(path, len(rows))
    prompts = [
        _text(row.get(column), f"{unit} {n} of {path}", column) for row, n in zip(rows, numbers, strict=True)
    ]
    empty = [n for n, p in zip(numbers, prompts, strict=True) if not p.strip()]
    if empty:
        raise DataError(
            f"{path}: {plural(len(empty), unit)} with an empty '{column}' ({unit} {shown(empty)}); "
            "fill them in or remove them"
        )
    return prompts


def split_pairs(pairs: Sequence[R], ratio: float = 0.1, seed: int = 0) -> tuple[list[R], list[R]]:
    """(train, held out): a seeded shuffle with ``ratio`` of the pairs (or KTO's rows; at least one) held out."""
    if not 0 < ratio < 1:
        raise ConfigError(
            f"the held-out ratio must be between 0 and 1 (got {ratio}); e.g. --validation-ratio 0.1"
        )
    if len(pairs) < 2:
        raise ConfigError(
            f"{len(pairs)} pair(s) cannot be split into train and held-out pairs; give more pairs "
            "or a separate --validation-data file"
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = min(len(pairs) - 1, max(1, round(len(pairs) * ratio)))
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]
