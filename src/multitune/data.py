"""User data files to :class:`Example` lists and train/validation/test splits.

Users bring whatever file they have: CSV, TSV, JSON, JSON Lines or Parquet, with whatever column names.
This module reads it, finds the columns (by name when given, else from common names), and turns every
row into an :class:`Example`. Every problem a user can cause raises :class:`DataError` (or
:class:`ConfigError` for bad settings) with one line naming the file, the problem and the fix, and the
checks report every offending column at once rather than the first.

Splitting is deterministic for a seed (its own ``random.Random``, never the global state) and stratified
by label for classification, so a small class still appears in every split it can.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from multitune.errors import ConfigError, DataError
from multitune.tables import json_type, read_lines, read_table, shown

TaskKind = Literal["classification", "generation", "domain"]  # domain: raw text, self-supervised (domain.py)


# Common column names, best first: auto-detection takes the first name present (case-insensitive).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "text": (
        "text",
        "sentence",
        "review",
        "question",
        "content",
        "sms",
        "document",
        "input_text",
        "utterance",
    ),
    "text_pair": (),  # never guessed: a wrong guess would silently turn a task into a pair task
    "label": ("label", "labels", "category", "class", "target", "intent", "sentiment"),
    "prompt": ("prompt", "instruction", "question", "query"),
    "input": ("input", "context"),
    "response": ("response", "output", "completion", "answer", "target"),
}
ROLES: dict[str, tuple[str, ...]] = {  # the roles each kind reads, required ones first
    "classification": ("text", "label", "text_pair"),
    "generation": ("prompt", "response", "input"),
    "domain": ("text",),
}
REQUIRED = {"classification": ("text", "label"), "generation": ("prompt", "response"), "domain": ("text",)}
KINDS = tuple(REQUIRED)
TEXT_FILE = ".txt"  # one document per line: read by --kind domain alone


def task_kind(kind: str) -> TaskKind:
    """``kind`` checked to be a :data:`TaskKind` (settings, flags and adapter files give a plain string)."""
    if kind not in REQUIRED:
        raise ConfigError(f"task kind '{kind}' is unknown; use 'classification', 'generation' or 'domain'")
    return cast(TaskKind, kind)


@dataclass(frozen=True)
class Columns:
    """Which columns of the user's file hold what. None = auto-detect from common names."""

    text: str | None = None  # classification input
    text_pair: str | None = None  # optional second text (NLI-style pairs); never auto-detected
    label: str | None = None  # classification label
    prompt: str | None = None  # generation: the prompt (or instruction)
    input: str | None = None  # generation: optional extra input appended to the instruction (Alpaca 'input')
    response: str | None = None  # generation: the target text


@dataclass(frozen=True)
class Example:
    """One row; for generation ``text`` is the whole prompt (instruction + input), ``response`` the target."""

    text: str = ""
    text_pair: str | None = None
    label: str | None = None  # always a string: ints in the file become "0", "1", ...
    response: str | None = None


@dataclass
class Splits:
    """The three splits and the classification label set (from train; [] for generation)."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]


def _flag(role: str) -> str:
    return f"--{role.replace('_', '-')}-column"


# ---- rows to examples ---------------------------------------------------------------------------------
def load_examples(
    path: str | Path, kind: TaskKind, columns: Columns = Columns(), drop_empty: bool = False
) -> list[Example]:
    """Read ``path`` and turn each row into an :class:`Example` for ``kind``.

    Rows whose required fields (text/label, or prompt/response, and the text pair when given) are empty
    or whitespace raise :class:`DataError` naming the rows, unless ``drop_empty`` drops them. Labels are
    stripped strings; texts are kept exactly as written.
    """
    task_kind(kind)  # (a caller without type checking may pass any string)
    path = Path(path)
    rows = _rows(path, kind)
    found = list(dict.fromkeys(k for row in rows for k in row))  # union of keys, first-seen order
    mapping = _resolve_columns(path, kind, columns, found)
    values = {
        role: [_as_text(path, i, col, row.get(col)) for i, row in enumerate(rows, 1)]
        for role, col in mapping.items()
    }
    checked = [r for r in (*REQUIRED[kind], "text_pair") if r in mapping]
    empty = {r: [i for i, v in enumerate(values[r], 1) if not v.strip()] for r in checked}
    bad_rows = sorted({i for rows_ in empty.values() for i in rows_})
    if bad_rows and not drop_empty:
        problems = [
            f"{len(rs)} rows have an empty '{mapping[r]}' (rows {shown(rs)})" for r, rs in empty.items() if rs
        ]
        raise DataError(
            f"{path}: {'; '.join(problems)} (row 1 is the first data row); remove them or pass --drop-empty"
        )
    bad = set(bad_rows)
    keep = [i for i in range(len(rows)) if i + 1 not in bad]
    if not keep:
        raise DataError(
            f"{path}: all {len(rows)} rows have an empty "
            f"{' or '.join(repr(mapping[r]) for r in checked)}; fill them in"
        )
    return [_example(kind, values, i) for i in keep]


def _rows(path: Path, kind: str) -> list[dict[str, object]]:
    """The file's rows; a .txt file (domain tasks only) is one row per non-blank line, in a column 'text'."""
    if path.suffix.lower() != TEXT_FILE:
        return read_table(path)
    if kind != "domain":
        raise DataError(
            f"{path} is plain text (one document per line), which only --kind domain reads; a {kind} task needs "
            "a table (.csv .tsv .json .jsonl .parquet) with its columns"
        )
    return [{"text": line} for line in read_lines(path)]


def _example(kind: str, values: dict[str, list[str]], i: int) -> Example:
    if kind == "domain":
        return Example(text=values["text"][i])
    if kind == "classification":
        pair = values["text_pair"][i] if "text_pair" in values else None
        label = values["label"][i].strip() if "label" in values else None
        return Example(text=values["text"][i], text_pair=pair, label=label or None)
    prompt = values["prompt"][i]
    extra = values["input"][i] if "input" in values else ""
    if extra.strip():
        prompt = prompt + "\n\n" + extra
    return Example(text=prompt, response=values["response"][i] if "response" in values else None)


INPUTS = {"classification": ("text",), "generation": ("prompt",), "domain": ("text",)}


def load_inputs(
    path: str | Path, kind: TaskKind, columns: Columns = Columns()
) -> tuple[list[dict[str, object]], list[Example]]:
    """Rows to predict and their examples: only the input column is required; labels are used if present.

    Every row gets a prediction, so a row with an empty input is an error naming it, not dropped.
    """
    task_kind(kind)  # (a caller without type checking may pass any string)
    path = Path(path)
    rows = _rows(path, kind)
    found = list(dict.fromkeys(k for row in rows for k in row))
    mapping = _resolve_columns(path, kind, columns, found, required=INPUTS[kind])
    values = {
        role: [_as_text(path, i, col, row.get(col)) for i, row in enumerate(rows, 1)]
        for role, col in mapping.items()
    }
    role = INPUTS[kind][0]
    empty = [i for i, v in enumerate(values[role], 1) if not v.strip()]
    if empty:
        raise DataError(
            f"{path}: {len(empty)} rows have an empty '{mapping[role]}' (rows {shown(empty)}, "
            "row 1 is the first data row); fill them in or remove them"
        )
    return rows, [_example(kind, values, i) for i in range(len(rows))]


def _resolve_columns(
    path: Path, kind: str, columns: Columns, found: list[str], required: Sequence[str] | None = None
) -> dict[str, str]:
    """Role -> actual column name; reports every missing column at once, each with its flag."""
    required = REQUIRED[kind] if required is None else required
    every_role = dict.fromkeys(r for k in KINDS for r in ROLES[k])  # in ROLES' order
    wrong = [_flag(r) for r in every_role if r not in ROLES[kind] and getattr(columns, r) is not None]
    if wrong and kind == "domain":  # refused, not ignored: whoever names a label column expects it to be used
        raise ConfigError(
            f"{', '.join(wrong)}: --kind domain learns from the text alone (self-supervised) and reads no labels, "
            "prompts or responses; drop them, or train a classification or generation task to use them"
        )
    if wrong:
        other = "generation" if kind == "classification" else "classification"
        raise ConfigError(
            f"{', '.join(wrong)} apply to {other} tasks but this task is {kind}; "
            "drop them or change the task kind"
        )
    by_lower: dict[str, str] = {}
    for name in found:
        by_lower.setdefault(name.strip().lower(), name)
    mapping: dict[str, str] = {}
    problems: list[str] = []
    listing = f"columns found: {', '.join(found)}"
    for role in ROLES[kind]:  # explicit names first, so a guess never takes a column the user named
        wanted = getattr(columns, role)
        if wanted is None:
            continue
        actual = wanted if wanted in found else by_lower.get(wanted.strip().lower())
        if actual is None:
            problems.append(f"column '{wanted}' not found in {path}; {listing}. Pass {_flag(role)} NAME")
        else:
            mapping[role] = actual
    for role in ROLES[kind]:
        if getattr(columns, role) is not None:
            continue
        taken = set(mapping.values())
        free = [by_lower[c] for c in CANDIDATES[role] if c in by_lower and by_lower[c] not in taken]
        guess = free[0] if free else None
        if guess is not None:
            mapping[role] = guess
        elif role in required:
            problems.append(
                f"no {role} column found in {path} (looked for {', '.join(CANDIDATES[role])}); "
                f"{listing}. Pass {_flag(role)} NAME"
            )
    if problems:
        raise DataError("; ".join(problems))
    used = list(mapping.values())
    twice = sorted({c for c in used if used.count(c) > 1})
    if twice:
        roles = [r for r, c in mapping.items() if c == twice[0]]
        raise DataError(
            f"column '{twice[0]}' of {path} is used for both {' and '.join(roles)}; "
            f"pass a different column to {_flag(roles[-1])}"
        )
    return mapping


def _as_text(path: Path, row: int, column: str, value: object) -> str:
    """A cell as a string: None/NaN -> "", integer-valued floats -> "1" (so 1.0 and 1 are one label)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | dict):
        raise DataError(
            f"row {row} of {path}: column '{column}' holds a {json_type(value)}, not a text or "
            "label; pick another column or flatten the data"
        )
    return str(value)


# ---- labels and splits --------------------------------------------------------------------------------
_INT = re.compile(r"[+-]?\d+")


def label_set(examples: Sequence[Example]) -> list[str]:
    """Distinct labels, numerically sorted when all are integers ("2" < "10"), else lexicographically."""
    labels = {ex.label for ex in examples if ex.label is not None}
    if labels and all(_INT.fullmatch(lab) for lab in labels):
        return sorted(labels, key=lambda lab: (int(lab), lab))
    return sorted(labels)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(not math.isfinite(r) or r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(
            f"split ratios {', '.join(str(r) for r in ratios)} are invalid; give three "
            "non-negative numbers (train, validation, test) that sum to 1, "
            "e.g. --split 0.8,0.1,0.1"
        )
    return float(ratios[0]), float(ratios[1]), float(ratios[2])


def _groups(examples: Sequence[Example], stratify: bool) -> list[list[Example]]:
    """Examples by label in label order (one group when not stratifying or when no example has a label)."""
    if not stratify or all(ex.label is None for ex in examples):
        return [list(examples)]
    by_label: dict[str | None, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    order: list[str | None] = [*label_set(examples), None]
    return [by_label[lab] for lab in order if lab in by_label]


def split_examples(
    examples: Sequence[Example],
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: bool = True,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic train/validation/test split, stratified by label when the examples have labels.

    Per group (class), validation and test get ``round(n * ratio)`` examples, shrunk if needed so that
    train keeps at least one example of every class (when the train ratio is positive), so carved splits
    never hold a label the model was not trained on.
    """
    r_train, r_val, r_test = _check_ratios(ratios)
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    for group in _groups(examples, stratify):
        group = list(group)
        rng.shuffle(group)
        n = len(group)
        n_val, n_test = math.floor(n * r_val + 0.5), math.floor(n * r_test + 0.5)
        room = n - (1 if r_train > 0 and n > 0 else 0)
        while n_val + n_test > room:  # take back from the larger of the two, test first on ties
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    for split in (train, val, test):
        rng.shuffle(split)
    return train, val, test


def _sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """At most ``n`` examples, stratified: one per class first if possible, the rest by largest remainder."""
    if len(examples) <= n:
        return examples
    rng = random.Random(seed)
    groups = [list(g) for g in _groups(examples, stratify=True)]
    for g in groups:
        rng.shuffle(g)
    take = [1 if n >= len(groups) else 0 for _ in groups]
    left = n - sum(take)
    shares = [(len(g) - t) * left / (len(examples) - sum(take)) for g, t in zip(groups, take, strict=True)]
    extra = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(groups)), key=lambda i: (-(shares[i] - extra[i]), i))
    for i in by_remainder[: left - sum(extra)]:
        extra[i] += 1
    chosen = [ex for g, t, e in zip(groups, take, extra, strict=True) for ex in g[: t + e]]
    rng.shuffle(chosen)
    return chosen


def prepare_splits(
    train_path: str | Path,
    kind: TaskKind,
    columns: Columns = Columns(),
    validation_path: str | Path | None = None,
    test_path: str | Path | None = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    drop_empty: bool = False,
    max_examples: int | None = None,
    known_labels: Sequence[str] = (),
) -> Splits:
    """Load the data, carve the splits not given as files, cap train at ``max_examples``, check the labels.

    ``known_labels``: the labels the task already has (``update``: new data may bring one label only, its
    training rows are rehearsed beside the earlier ones'); they count towards the two a classifier needs and
    as labels evaluation rows may have.

    Separate validation/test files are used as-is; only the missing splits are carved from the train
    file, with the ratios renormalised among what is carved (only a test file given -> train/validation
    in the ratio train:validation). ``max_examples`` caps only the train split, after splitting, so the
    evaluation splits stay the same whatever the cap.
    """
    r_train, r_val, r_test = _check_ratios(ratios)
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples is {max_examples}; give a positive number or leave it unset")
    examples = load_examples(train_path, kind, columns, drop_empty)
    given_val = load_examples(validation_path, kind, columns, drop_empty) if validation_path else None
    given_test = load_examples(test_path, kind, columns, drop_empty) if test_path else None
    carve_val, carve_test = (r_val if given_val is None else 0.0), (r_test if given_test is None else 0.0)
    total = r_train + carve_val + carve_test
    carved = (1.0, 0.0, 0.0) if total == 0 else (r_train / total, carve_val / total, carve_test / total)
    train, val, test = split_examples(examples, carved, seed, stratify=kind == "classification")
    val = given_val if given_val is not None else val
    test = given_test if given_test is not None else test
    full_train = train
    if max_examples is not None:
        train = _sample(train, max_examples, seed)
    if not train:
        raise DataError(f"the train split of {train_path} is empty; use more data or a larger train ratio")
    labels = label_set(train) if kind == "classification" else []
    if kind == "classification":
        _check_labels(train_path, labels, full_train, validation_path, val, test_path, test, known_labels)
    return Splits(train=train, validation=val, test=test, labels=labels)


def _check_labels(
    train_path: str | Path,
    labels: list[str],
    full_train: list[Example],
    validation_path: str | Path | None,
    val: list[Example],
    test_path: str | Path | None,
    test: list[Example],
    known_labels: Sequence[str] = (),
) -> None:
    """Classification needs two labels in train, and no evaluation label the classifier head cannot output."""
    all_known = set(label_set(full_train)) | set(known_labels)
    if len(set(labels) | set(known_labels)) < 2:
        fix = (
            f"raise --max-examples to at least {len(all_known)}"
            if len(all_known) >= 2
            else "classification needs examples of at least two labels"
        )
        raise DataError(f"the train split of {train_path} has only one label ({labels[0]!r}); {fix}")
    known = set(labels) | set(known_labels)
    for name, path, split in (("validation", validation_path, val), ("test", test_path, test)):
        unseen = label_set([ex for ex in split if ex.label not in known])
        if not unseen:
            continue
        source = f"file {path}" if path else f"split of {train_path}"
        if not set(unseen) - all_known:  # only the cap dropped them
            fix = f"raise --max-examples to at least {len(all_known)} so every label is kept"
        else:
            fix = f"fix those labels in {path or train_path} or add training examples of them"
        raise DataError(
            f"the {name} {source} has {len(unseen)} labels not in the training data "
            f"({shown([repr(u) for u in unseen])}); {fix}"
        )
