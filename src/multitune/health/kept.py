"""The data a task keeps for its updates: its test split (to measure forgetting) and a sample of its training
rows (to rehearse), as JSON lines in ``data/`` of the task root or of a version (:mod:`multitune.health.versions`).

``train`` and ``train-multi`` keep them unless ``--no-keep-replay``; ``update`` keeps the new data's. The rows
are the user's own, beside the adapter they trained: a folder shared with others should be trained with
``--no-keep-replay`` (``update --strategy naive`` or ``--replay-data FILE`` still work then).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from multitune.data import Example, Splits
from multitune.errors import ConfigError
from multitune.storage import write_bytes_atomic, write_json_atomic

TEST_FILE = "test.jsonl"
VALIDATION_FILE = "validation.jsonl"  # what `multitune merge --search` chooses on (never the test split)
SOURCE_FILE = "source.json"  # where the rows came from: the data settings (DataConfig) and the split sizes
REPLAY_FILE = "replay.jsonl"
REPLAY_MIN = 500  # rows kept at least (all of a smaller training set) ...
REPLAY_SHARE = 0.1  # ... or this share of the training rows, whichever is more


def replay_size(rows: int) -> int:
    """How many training rows are kept to be rehearsed later."""
    return min(rows, max(REPLAY_MIN, math.ceil(REPLAY_SHARE * rows)))


def sample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` of ``examples`` drawn without replacement by a seeded permutation, in their original order."""
    if n >= len(examples):
        return list(examples)
    keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n]
    return [examples[i] for i in sorted(keep.tolist())]


def sample_by_label(
    examples: Sequence[Example], n: int, seed: int, floor: int = 0, floored: set[str] | None = None
) -> list[Example]:
    """``n`` of ``examples`` drawn label by label (each label its share of ``n``, rounded up), and at least
    ``floor`` rows (as far as it has them) of each label in ``floored`` (default: every label): a rehearsal
    sample in which no earlier label is left out (class-incremental updates forget the labels that a small
    proportional sample leaves with a row or two). In the original order."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.label or "", []).append(i)
    total = len(examples)
    generator = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for label in sorted(groups):
        members = groups[label]
        share = math.ceil(n * len(members) / total)
        least = floor if floored is None or label in floored else 0
        order = torch.randperm(len(members), generator=generator)[: min(len(members), max(least, share))]
        keep += [members[j] for j in order.tolist()]
    return [examples[i] for i in sorted(keep)]


def write_examples(path: Path, examples: Sequence[Example]) -> None:
    lines = (json.dumps({k: v for k, v in asdict(ex).items() if v is not None}) for ex in examples)
    write_bytes_atomic(path, "".join(line + "\n" for line in lines).encode())


def read_examples(path: Path) -> list[Example]:
    """The rows of a kept file; a damaged one is one line naming it."""
    fields = set(Example.__dataclass_fields__)
    out = []
    try:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not set(row) <= fields:
                raise ValueError(f"line {number} is not an example")
            out.append(Example(**row))
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"{path} is damaged ({error}); remove it, or restore it from a copy") from error
    return out


def keep(
    folder: Path,
    splits: Splits,
    data: dict[str, Any],
    seed: int,
    replay: bool,
) -> None:
    """Write ``folder/test.jsonl``, ``folder/validation.jsonl``, ``folder/source.json`` (``data``: the data settings the splits were read with,
    and the splits' sizes) and, when ``replay``, ``folder/replay.jsonl`` (a seeded sample of the training rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = splits.train
    write_examples(folder / TEST_FILE, splits.test)
    write_examples(folder / VALIDATION_FILE, splits.validation)
    sizes = {"train": len(train), "validation": len(splits.validation), "test": len(splits.test)}
    write_json_atomic(folder / SOURCE_FILE, {"data": data, "examples": sizes, "labels": splits.labels})
    if replay:
        write_examples(folder / REPLAY_FILE, sample(train, replay_size(len(train)), seed))


def read_source(folder: Path) -> dict[str, Any] | None:
    """``source.json`` of a kept folder, None when there is none."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder / SOURCE_FILE} is damaged ({type(error).__name__}); remove it") from error
    return record if isinstance(record, dict) else None
