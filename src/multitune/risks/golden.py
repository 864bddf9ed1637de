"""Golden sets: inputs with reference outputs that every version of a task is scored on, so that an update
which loses facts the task used to get right is seen (and, in ``multitune update``, refused).

A golden set is a data file of the task's kind (text and label; prompt and response). Its score is accuracy for
a classification task; for a generation task the greedy answers' exact match, SQuAD token F1 and ROUGE-L
against the references, with ROUGE-L as the score (the project's generation metric). ``train --golden FILE``
scores the trained task and keeps the rows in the run folder (``golden.jsonl``, beside the kept training rows)
so that every later ``update`` scores the current and the new version on them; ``update --golden FILE``
replaces them; ``audit --golden FILE`` scores any run or task folder on a file.

The change is in points: 100 x (new - old) of the score (one point is one golden row in a hundred).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitune.data import Columns, Example, load_examples, task_kind
from multitune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel
    from multitune.config import TrainConfig

GOLDEN_FILE = "golden.jsonl"


def read_golden(path: str | Path, kind: str, columns: Columns | None = None) -> list[Example]:
    """The golden rows of ``path`` for a task of ``kind``; a file without rows or references is refused."""
    examples = load_examples(path, task_kind(kind), columns or Columns())
    if not examples:
        raise DataError(
            f"the golden set {path} has no rows; give a file of inputs with their reference outputs"
        )
    if kind == "generation" and any(ex.response is None for ex in examples):
        raise DataError(
            f"the golden set {path} has no response column: a golden row needs its reference answer "
            "(--response-column names it)"
        )
    return examples


def save_golden(root: Path, examples: list[Example]) -> Path:
    """Keep the golden rows in ``root/golden.jsonl`` (atomically)."""
    from multitune.storage import write_bytes_atomic

    lines = [
        json.dumps({k: v for k, v in vars(ex).items() if v is not None}, ensure_ascii=False)
        for ex in examples
    ]
    path = root / GOLDEN_FILE
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def kept_golden(root: Path) -> list[Example] | None:
    """The golden rows a run or task root keeps, or None."""
    path = root / GOLDEN_FILE
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(**row) for row in rows]


def score_golden(
    bank: MultiTaskModel, task: str, examples: list[Example], config: TrainConfig
) -> dict[str, Any]:
    """``{"metric", "score", "rows", ...}``: accuracy, or ROUGE-L with exact match and token F1 beside it."""
    from multitune.metrics import exact_match, rouge_l, token_f1
    from multitune.training.evaluate import generate_texts, predict_labels

    spec = bank.tasks[task]
    if spec.kind == "classification":
        unknown = sorted({ex.label or "" for ex in examples} - set(spec.labels))
        if unknown:
            raise ConfigError(
                f"the golden set has label(s) {', '.join(unknown[:5])} that task '{task}' does not know "
                f"({', '.join(spec.labels[:10])}); fix the labels or add them with update --add-labels"
            )
        predicted = predict_labels(bank, task, examples, config.max_length, config.eval_batch_size)
        hits = sum(p == ex.label for p, ex in zip(predicted, examples, strict=True))
        return {"metric": "accuracy", "score": hits / len(examples), "rows": len(examples)}
    answers = generate_texts(bank, task, examples, config.max_length, config.max_new_tokens)
    references = [ex.response or "" for ex in examples]
    return {
        "metric": "rouge_l",
        "score": rouge_l(answers, references),
        "exact_match": exact_match(answers, references),
        "token_f1": token_f1(answers, references),
        "rows": len(examples),
    }


def golden_line(result: dict[str, Any], name: str = "golden set") -> str:
    extra = ""
    if result["metric"] == "rouge_l":
        extra = f", exact match {result['exact_match']:.3f}, token F1 {result['token_f1']:.3f}"
    return f"{name}: {result['metric']} {result['score']:.4f} on {result['rows']} rows{extra}"
