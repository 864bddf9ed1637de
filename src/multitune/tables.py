"""Data files to rows and rows back to files: CSV, TSV, JSON (an array of objects), JSON Lines, Parquet.

Whatever the format, a file becomes a list of rows (``dict`` of column -> value). Every problem a user can cause
raises :class:`~multitune.errors.DataError` with one line naming the file, the row or line, and the fix: a
missing file, an unknown extension, a file that is not the format its name says, bad encoding, a JSON file that
is not a list of objects, a broken JSON line (by number).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from multitune.errors import DataError

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
SUPPORTED = ".csv .tsv .json .jsonl .ndjson .parquet"
SHOWN = 5  # how many row numbers / labels an error message lists before "..."


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
    raw = _read_bytes(path, "it needs at least one row of data")
    if fmt == "parquet":
        return _read_parquet(path, raw)
    text = _decode(path, raw, fmt)
    rows = {"csv": _read_csv, "tsv": _read_csv, "json": _read_json, "jsonl": _read_jsonl}[fmt](path, text)
    if not rows:
        raise DataError(f"{path} is empty (no data rows); it needs at least one row of data")
    return rows


def _read_bytes(path: Path, empty_fix: str) -> bytes:
    """The file's bytes; a missing path, a directory or an empty file is one line with ``empty_fix``."""
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (*FORMATS, ".txt"))
        hint = f" (data files inside: {shown(inside)})" if inside else ""
        raise DataError(f"{path} is a directory, not a data file; pass one file{hint}")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; {empty_fix}")
    return raw


def read_lines(path: str | Path) -> list[str]:
    """A plain-text file's non-blank lines, as written (one document per line: ``--kind domain``)."""
    path = Path(path)
    text = _decode(path, _read_bytes(path, "write one document per line"), "txt")
    return [line for line in text.splitlines() if line.strip()]


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
                f"{path} holds a JSON object with keys {shown(list(data))}; expected an array "
                "of row objects, or an object with exactly one list of rows such as "
                '{"data": [...]}'
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected an array of row objects")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(
                f"row {i} of {path} is a {json_type(row)}, not an object; "
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
                f"line {number} of {path} holds a {json_type(row)}, not an object; "
                'each line must hold one JSON object such as {"text": ..., "label": ...}'
            )
        rows.append(row)
    return rows


def json_type(value: object) -> str:
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


def shown(items: Sequence[object]) -> str:
    """The first few items, comma-separated, so one-line messages stay short on big files."""
    head = ", ".join(str(i) for i in items[:SHOWN])
    return head + (", ..." if len(items) > SHOWN else "")
