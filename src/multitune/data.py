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

import csv
import io
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from multitune.errors import ConfigError, DataError

TaskKind = Literal["classification", "generation"]

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
SUPPORTED = ".csv .tsv .json .jsonl .ndjson .parquet"

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
}
REQUIRED = {"classification": ("text", "label"), "generation": ("prompt", "response")}
SHOWN = 5  # how many row numbers / labels an error message lists before "..."


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


def _shown(items: Sequence[object]) -> str:
    """The first few items, comma-separated, so one-line messages stay short on big files."""
    head = ", ".join(str(i) for i in items[:SHOWN])
    return head + (", ..." if len(items) > SHOWN else "")


# ---- reading files ------------------------------------------------------------------------------------
def read_table(path: str | Path) -> list[dict[str, object]]:
    """Rows of a data file as dicts, by extension; CSV/TSV values are strings, JSON/Parquet keep types."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path} has an unsupported extension '{path.suffix}'; use one of {SUPPORTED} "
            "(export spreadsheets as .csv)"
        )
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FORMATS)
        hint = f" (data files inside: {_shown(inside)})" if inside else ""
        raise DataError(f"{path} is a directory, not a data file; pass one file{hint}")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; it needs at least one row of data")
    if fmt == "parquet":
        return _read_parquet(path, raw)
    text = _decode(path, raw, fmt)
    rows = {"csv": _read_csv, "tsv": _read_csv, "json": _read_json, "jsonl": _read_jsonl}[fmt](path, text)
    if not rows:
        raise DataError(f"{path} is empty (no data rows); it needs at least one row of data")
    return rows


def _decode(path: Path, raw: bytes, fmt: str) -> str:
    """UTF-8 text (BOM accepted), after catching the usual wrong-file cases before they parse as garbage."""
    if raw.startswith(b"PAR1"):
        raise DataError(f"{path} is a Parquet file, not {fmt.upper()} text; rename it to .parquet")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text, not UTF-8; re-save it as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path} looks binary (NUL byte at offset {nul}), not {fmt.upper()} text; "
            f"pass a text {fmt.upper()} file or use the extension that matches its format"
        )
    bom = len(b"\xef\xbb\xbf") if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise DataError(
            f"{path} is not valid UTF-8 (byte 0x{raw[at]:02x} at offset {at}); re-save it as UTF-8"
        ) from None


def _read_csv(path: Path, text: str) -> list[dict[str, object]]:
    """CSV with the usual quoting; TSV the IANA way (tabs separate, quotes are literal, as in SMS Spam)."""
    _reject_json_in_csv(path, text)
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter="\t" if tsv else ",",
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
    )
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows: list[dict[str, object]] = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # blank line
            if len(fields) > len(header):
                raise DataError(
                    f"line {reader.line_num} of {path} has {len(fields)} fields but the header "
                    f"has {len(header)}; quote fields that contain the separator"
                )
            rows.append({name: (fields[i] if i < len(fields) else "") for i, name in enumerate(header)})
    except csv.Error as e:
        fmt = "TSV" if tsv else "CSV"
        raise DataError(
            f"line {reader.line_num} of {path} cannot be parsed as {fmt} ({e}); fix the quoting on that line"
        ) from None
    return rows


def _reject_json_in_csv(path: Path, text: str) -> None:
    """A .csv holding JSON would parse as one odd column; say what it is instead."""
    stripped = text.lstrip()
    if not stripped.startswith(("[", "{")):
        return
    if _parses(stripped):
        raise DataError(f"{path} holds JSON, not {path.suffix[1:].upper()}; rename it to .json")
    if _parses(stripped.splitlines()[0]):
        raise DataError(f"{path} holds JSON Lines, not {path.suffix[1:].upper()}; rename it to .jsonl")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _read_json(path: Path, text: str) -> list[dict[str, object]]:
    """A JSON array of objects, or an object whose one list-valued key holds them ({"data": [...]})."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        hint = "; if it is CSV rename it to .csv"
        if first.startswith("{") and _parses(first):
            hint = "; it looks like JSON Lines (one object per line), so rename it to .jsonl"
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise DataError(f"{path} is not valid JSON ({where}){hint}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path} holds a JSON object with keys {_shown(list(data))}; expected an array "
                "of row objects, or an object with exactly one list of rows such as "
                '{"data": [...]}'
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected an array of row objects")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(
                f"row {i} of {path} is a {_json_type(row)}, not an object; "
                'each row must be an object such as {"text": ..., "label": ...}'
            )
    return data


def _read_jsonl(path: Path, text: str) -> list[dict[str, object]]:
    """One JSON object per line; blank lines are skipped, a bad line is named by its number."""
    rows: list[dict[str, object]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = "each line must hold one JSON object"
            if number == 1 and text.lstrip().startswith("[") and _parses(text):
                hint = "the file is one JSON array, so rename it to .json"
            raise DataError(
                f"line {number} of {path} is not valid JSON ({e.msg} at column {e.colno}); {hint}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"line {number} of {path} holds a {_json_type(row)}, not an object; "
                'each line must hold one JSON object such as {"text": ..., "label": ...}'
            )
        rows.append(row)
    return rows


def _json_type(value: object) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_parquet(path: Path, raw: bytes) -> list[dict[str, object]]:
    """Parquet via pyarrow; checks the magic bytes first so a mislabelled file gets a plain message."""
    if not (raw.startswith(b"PAR1") and raw.endswith(b"PAR1")):
        raise DataError(
            f"{path} is not a Parquet file (no PAR1 magic bytes); "
            "use the extension that matches its format (.csv .tsv .json .jsonl)"
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} cannot be read as Parquet ({first}); re-export it") from None
    if not rows:
        raise DataError(f"{path} is empty (no data rows); it needs at least one row of data")
    return rows


# ---- rows to examples ---------------------------------------------------------------------------------
def load_examples(
    path: str | Path, kind: TaskKind, columns: Columns = Columns(), drop_empty: bool = False
) -> list[Example]:
    """Read ``path`` and turn each row into an :class:`Example` for ``kind``.

    Rows whose required fields (text/label, or prompt/response, and the text pair when given) are empty
    or whitespace raise :class:`DataError` naming the rows, unless ``drop_empty`` drops them. Labels are
    stripped strings; texts are kept exactly as written.
    """
    if kind not in REQUIRED:
        raise ConfigError(f"task kind '{kind}' is unknown; use 'classification' or 'generation'")
    path = Path(path)
    rows = read_table(path)
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
            f"{len(rs)} rows have an empty '{mapping[r]}' (rows {_shown(rs)})"
            for r, rs in empty.items()
            if rs
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


def _example(kind: str, values: dict[str, list[str]], i: int) -> Example:
    if kind == "classification":
        pair = values["text_pair"][i] if "text_pair" in values else None
        label = values["label"][i].strip() if "label" in values else None
        return Example(text=values["text"][i], text_pair=pair, label=label or None)
    prompt = values["prompt"][i]
    extra = values["input"][i] if "input" in values else ""
    if extra.strip():
        prompt = prompt + "\n\n" + extra
    return Example(text=prompt, response=values["response"][i] if "response" in values else None)


INPUTS = {"classification": ("text",), "generation": ("prompt",)}


def load_inputs(
    path: str | Path, kind: TaskKind, columns: Columns = Columns()
) -> tuple[list[dict[str, object]], list[Example]]:
    """Rows to predict and their examples: only the input column is required; labels are used if present.

    Every row gets a prediction, so a row with an empty input is an error naming it, not dropped.
    """
    if kind not in REQUIRED:
        raise ConfigError(f"task kind '{kind}' is unknown; use 'classification' or 'generation'")
    path = Path(path)
    rows = read_table(path)
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
            f"{path}: {len(empty)} rows have an empty '{mapping[role]}' (rows {_shown(empty)}, "
            "row 1 is the first data row); fill them in or remove them"
        )
    return rows, [_example(kind, values, i) for i in range(len(rows))]


def write_table(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write rows in the format of ``path``'s extension, atomically (a temporary file, then a rename)."""
    import os
    import tempfile

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot write {path}: unsupported extension '{path.suffix}'; use one of {SUPPORTED}")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        if fmt == "parquet":
            os.close(fd)
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                if fmt in ("csv", "tsv"):
                    writer = csv.DictWriter(
                        f,
                        fieldnames=fields,
                        delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                        escapechar="\\" if fmt == "tsv" else None,
                    )
                    writer.writeheader()
                    writer.writerows(rows)
                elif fmt == "json":
                    json.dump(list(rows), f, ensure_ascii=False, indent=1)
                else:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        from multitune.storage import publish_mode

        publish_mode(tmp)  # the umask's mode, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _resolve_columns(
    path: Path, kind: str, columns: Columns, found: list[str], required: Sequence[str] | None = None
) -> dict[str, str]:
    """Role -> actual column name; reports every missing column at once, each with its flag."""
    required = REQUIRED[kind] if required is None else required
    other = "generation" if kind == "classification" else "classification"
    wrong = [_flag(r) for r in ROLES[other] if getattr(columns, r) is not None]
    if wrong:
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
            f"row {row} of {path}: column '{column}' holds a {_json_type(value)}, not a text or "
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
) -> Splits:
    """Load the data, carve the splits not given as files, cap train at ``max_examples``, check the labels.

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
        _check_labels(train_path, labels, full_train, validation_path, val, test_path, test)
    return Splits(train=train, validation=val, test=test, labels=labels)


def _check_labels(
    train_path: str | Path,
    labels: list[str],
    full_train: list[Example],
    validation_path: str | Path | None,
    val: list[Example],
    test_path: str | Path | None,
    test: list[Example],
) -> None:
    """Classification needs two labels in train, and no evaluation label the classifier head cannot output."""
    all_known = set(label_set(full_train))
    if len(labels) < 2:
        fix = (
            f"raise --max-examples to at least {len(all_known)}"
            if len(all_known) >= 2
            else "classification needs examples of at least two labels"
        )
        raise DataError(f"the train split of {train_path} has only one label ({labels[0]!r}); {fix}")
    known = set(labels)
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
            f"({_shown([repr(u) for u in unseen])}); {fix}"
        )
