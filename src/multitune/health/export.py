"""The feedback store as training data: the next round of ``train``/``update`` and of the preference commands.

- classification: the answers that got a label, as ``text,label`` rows (what ``multitune train --data`` reads);
- generation: the answers rated good and the corrections, as ``prompt,response`` rows (supervised fine-tuning);
- generation preferences (:func:`export_preferences`): every rating as an unpaired example for KTO, TRL's
  unpaired format ``{"prompt", "completion", "label": true|false}`` (a correction is a desirable completion
  too), and every correction as a DPO pair ``{"prompt", "chosen": correction, "rejected": the answer}``,
  the ``prompt, chosen, rejected`` rows :func:`multitune.preference.pairs.load_pairs` reads
  (``multitune dpo --data``); ``--data feedback:BANK --task T`` trains on them without a file. The seeds'
  RLHF "with rewards from iterative human evaluations of the outputs".

Training needs the inputs, which the server keeps only with ``--log-requests``: feedback on answers whose input
was not logged is counted and left out, and an export left with nothing says so and names the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitune.errors import ConfigError, DataError
from multitune.tables import FORMATS, SUPPORTED, write_table

if TYPE_CHECKING:
    from multitune.health.store import FeedbackStore

NO_INPUTS = (
    "the server kept no inputs (start `multitune serve` with --log-requests to store them, then collect "
    "feedback again)"
)


def _feedback_rows(store: FeedbackStore, task: str, kind: str | None = None) -> list[dict[str, Any]]:
    rows = store.rows(task)
    if not rows:
        known = ", ".join(store.tasks()) or "none"
        raise DataError(
            f"the feedback store {store.target} holds no feedback for task '{task}' (tasks with answers: "
            f"{known}); send POST /v1/feedback for its answers first"
        )
    if kind is not None and rows[0]["kind"] != kind:
        raise ConfigError(
            f"task '{task}' is a {rows[0]['kind']} task; --preferences is for generation tasks, "
            "use --output for a training file"
        )
    return rows


def _with_inputs(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    kept = [row for row in rows if row["input"] is not None]
    if not kept:
        raise DataError(f"{len(rows)} answers of task '{task}' have feedback but {NO_INPUTS}")
    return kept


def _check_path(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"cannot write {path}: unsupported extension '{path.suffix}'; use one of {SUPPORTED}")


def export_classification(store: FeedbackStore, task: str, path: str | Path) -> int:
    """``text,label`` rows (classification) or ``prompt,response`` rows (generation: answers rated good and
    corrections) of the task's feedback, in the file's format; returns how many rows were written."""
    path = Path(path)
    _check_path(path)
    rows = _feedback_rows(store, task)
    out: list[dict[str, object]] = []
    if rows[0]["kind"] == "classification":
        out = [{"text": r["input"], "label": r["label"]} for r in _with_inputs(rows, task)]
    else:
        for row in _with_inputs(rows, task):
            if row["correction"] is not None:
                out.append({"prompt": row["input"], "response": row["correction"]})
            elif row["rating"] is not None and row["rating"] >= 0.5 and row["prediction"]:
                out.append({"prompt": row["input"], "response": row["prediction"]})
        if not out:
            raise DataError(
                f"task '{task}' has no answer rated good (>= 0.5) and no correction to train on; "
                "export --preferences to use the bad ratings"
            )
    write_table(path, out)
    return len(out)


def pairs_path(path: str | Path) -> Path:
    """Where the DPO pairs go beside the KTO rows of ``path``: ``out.jsonl`` -> ``out.pairs.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.pairs{path.suffix}")


def preference_rows(store: FeedbackStore, task: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(KTO rows, DPO pairs) of the task's rated and corrected answers, as the module docstring says; what
    :func:`export_preferences` writes and ``--data feedback:BANK`` trains on."""
    rows = _with_inputs(_feedback_rows(store, task, kind="generation"), task)
    unpaired: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for row in rows:
        prompt, answer = row["input"], row["prediction"] or ""
        if row["rating"] is not None and answer:
            unpaired.append({"prompt": prompt, "completion": answer, "label": row["rating"] >= 0.5})
        if row["correction"] is not None:
            unpaired.append({"prompt": prompt, "completion": row["correction"], "label": True})
            if row["correction"] != answer and answer:
                pairs.append({"prompt": prompt, "chosen": row["correction"], "rejected": answer})
    if not unpaired:
        raise DataError(f"task '{task}' has feedback but no rating or correction on a non-empty answer")
    return unpaired, pairs


def export_preferences(store: FeedbackStore, task: str, path: str | Path) -> dict[str, Any]:
    """KTO rows into ``path`` and DPO pairs into :func:`pairs_path` (written only when a correction exists);
    returns ``{"kto": rows, "pairs": pairs, "pairs_path": str | None}``."""
    path = Path(path)
    _check_path(path)
    unpaired, pairs = preference_rows(store, task)
    write_table(path, unpaired)
    target = None
    if pairs:
        target = pairs_path(path)
        write_table(target, pairs)
    return {"kto": len(unpaired), "pairs": len(pairs), "pairs_path": None if target is None else str(target)}
