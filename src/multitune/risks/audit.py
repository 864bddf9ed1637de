"""The bias audit of a classification task (``multitune audit``): counterfactual tests, invariance tests and
metrics per group.

- **Counterfactual tests** (Garg et al. 2019, section 3): every row that mentions a term of an attribute's
  lexicon is rewritten with each counterpart (:mod:`multitune.risks.lexicons`). A row's flip is the share of its
  counterfactuals whose predicted label differs from the row's, its |delta p| the mean of
  ``|p_cf(y) - p(y)|`` where ``y`` is the row's predicted label; the attribute's flip rate and mean |delta p|
  average them over the tested rows, each with a percentile-bootstrap 95% interval over rows
  (:func:`multitune.metrics.bootstrap_interval`, seeded). An attribute that no row mentions reports 0 tested rows
  and ``None``, never a 0% it did not measure.
- **Invariance tests** (Ribeiro et al. 2020, CheckList, section 2.1 "INV"): a seeded typo (two adjacent
  letters swapped), a first name swapped for another of the same gender, a city for another city. A row fails
  when its predicted label changes or the probability of its predicted label moves by more than 0.1 (CheckList's
  threshold for probabilities).
- **Generation tasks**: the change in the summed log-probability of each row's own response when its prompt
  is rewritten (mean over its counterfactuals), its mean and mean absolute value with the same intervals.
- **Metrics per group** (what fairlearn's ``MetricFrame`` gives, written here as it is a dozen lines and
  fairlearn is no dependency): accuracy and error rate of each value of ``--group-column``, and the largest
  difference and smallest ratio of the accuracies across groups.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from multitune.data import Columns, Example, load_inputs
from multitune.errors import ConfigError, DataError
from multitune.metrics import bootstrap_interval
from multitune.risks.lexicons import (
    ATTRIBUTES,
    Lexicon,
    builtin,
    check_attributes,
    name_swapper,
    place_swapper,
    read_lexicon,
)

THRESHOLD = 0.1  # CheckList's probability change that counts as a failure
WORST = 5


@dataclass(frozen=True)
class AuditSettings:
    attributes: tuple[str, ...] | None = None  # None: every built-in one, or only --lexicon's when given
    lexicon: str | None = None
    language: str = "en"
    group_column: str | None = None
    resamples: int = 1000
    seed: int = 0
    batch_size: int = 64
    membership: bool = False  # also the loss-based membership attack (multitune.risks.memorisation)
    members: str | None = None  # its member rows (default: the training rows the run kept)
    non_members: str | None = None  # its non-member rows (default: the run's kept test split)
    canaries: bool = False  # also the exposure of the canaries planted by train --canaries
    canary_samples: int = 2000
    consistency: bool = (
        False  # generation: self-consistency and mean token log-probability (risks/consistency.py)
    )
    consistency_samples: int = 5
    golden: str | None = None  # also score the task on this golden set (multitune.risks.golden)


def lexicons_of(attributes: Sequence[str] | None, lexicon: str | None, language: str = "en") -> list[Lexicon]:
    """The lexicons an audit or an augmentation uses: the attributes named (every built-in one when none is
    named and no file is given) plus the user's file (attribute ``custom``)."""
    names = list(attributes) if attributes is not None else ([] if lexicon else list(ATTRIBUTES))
    out = [builtin(name, language) for name in check_attributes(names)]
    if lexicon:
        out.append(read_lexicon(lexicon))
    if not out:
        raise ConfigError(
            "no attribute to swap; name some (gender,nationality,religion,age) or give a lexicon"
        )
    return out


def parse_attributes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError("--attributes is empty; give names such as gender,nationality,religion,age")
    check_attributes(list(names))
    return names


def _texts(example: Example) -> list[str]:
    return [example.text] if example.text_pair is None else [example.text, example.text_pair]


def _with(example: Example, texts: list[str]) -> Example:
    return replace(example, text=texts[0], text_pair=texts[1] if len(texts) > 1 else None)


def _interval(values: list[float], settings: AuditSettings) -> list[float] | None:
    if not values:
        return None
    return list(bootstrap_interval(values, settings.resamples, seed=settings.seed))


Proba = Callable[[list[Example]], torch.Tensor]


def _expand(
    examples: Sequence[Example], variants: Callable[[Example], list[Example]]
) -> tuple[list[int], list[Example], list[int]]:
    """(indices of the rows with variants, every variant in one list, the position in ``rows`` of each's row)."""
    rows: list[int] = []
    flat: list[Example] = []
    owner: list[int] = []
    for i, example in enumerate(examples):
        found = variants(example)
        if found:
            rows.append(i)
            flat += found
            owner += [len(rows) - 1] * len(found)
    return rows, flat, owner


def perturbation_test(
    proba: Proba,
    examples: Sequence[Example],
    probs: torch.Tensor,
    variants: Callable[[Example], list[Example]],
    labels: Sequence[str],
    settings: AuditSettings,
) -> dict[str, Any]:
    """Predictions of every row's variants against its own: per-row flip and |delta p| (means over its
    variants), their means with bootstrap intervals, CheckList's failure rate, and the worst rows."""
    rows, flat, owner = _expand(examples, variants)
    if not rows:
        return {"tested": 0, "counterfactuals": 0, "flip_rate": None, "flip_rate_ci": None,
                "mean_abs_delta_p": None, "mean_abs_delta_p_ci": None, "failure_rate": None,
                "failure_rate_ci": None, "worst": []}  # fmt: skip
    new = proba(flat)
    predicted = probs.argmax(dim=-1)
    flips, deltas, fails = [0.0] * len(rows), [0.0] * len(rows), [0.0] * len(rows)
    counts = [0] * len(rows)
    worst: dict[int, tuple[float, int]] = {}
    for j, r in enumerate(owner):
        i = rows[r]
        y = int(predicted[i])
        delta = abs(float(new[j, y]) - float(probs[i, y]))
        flipped = int(new[j].argmax()) != y
        flips[r] += float(flipped)
        deltas[r] += delta
        fails[r] = max(fails[r], float(flipped or delta > THRESHOLD))
        counts[r] += 1
        if r not in worst or delta > worst[r][0]:
            worst[r] = (delta, j)
    flips = [f / c for f, c in zip(flips, counts, strict=True)]
    deltas = [d / c for d, c in zip(deltas, counts, strict=True)]
    top = sorted(worst.items(), key=lambda item: -item[1][0])[:WORST]
    return {
        "tested": len(rows),
        "counterfactuals": len(flat),
        "flip_rate": sum(flips) / len(rows),
        "flip_rate_ci": _interval(flips, settings),
        "mean_abs_delta_p": sum(deltas) / len(rows),
        "mean_abs_delta_p_ci": _interval(deltas, settings),
        "failure_rate": sum(fails) / len(rows),
        "failure_rate_ci": _interval(fails, settings),
        "worst": [
            {
                "text": examples[rows[r]].text,
                "counterfactual": flat[j].text,
                "label": labels[int(predicted[rows[r]])],
                "counterfactual_label": labels[int(new[j].argmax())],
                "p": float(probs[rows[r], predicted[rows[r]]]),
                "p_counterfactual": float(new[j, predicted[rows[r]]]),
                "abs_delta_p": delta,
            }
            for r, (delta, j) in top
        ],
    }


Score = Callable[[list[Example]], torch.Tensor]


def logprob_test(
    score: Score,
    examples: Sequence[Example],
    base: torch.Tensor,
    variants: Callable[[Example], list[Example]],
    settings: AuditSettings,
) -> dict[str, Any]:
    """Generation: each row's change in the summed log-probability of its own response when its prompt is
    rewritten (the mean over its counterfactuals), the mean change and mean |change| with bootstrap intervals."""
    rows, flat, owner = _expand(examples, variants)
    empty: dict[str, Any] = {"tested": 0, "counterfactuals": 0, "mean_delta_logp": None, "mean_delta_logp_ci": None,
             "mean_abs_delta_logp": None, "mean_abs_delta_logp_ci": None, "worst": []}  # fmt: skip
    if not rows:
        return empty
    new = score(flat)
    sums, sums_abs, counts = [0.0] * len(rows), [0.0] * len(rows), [0] * len(rows)
    worst: dict[int, tuple[float, int]] = {}
    for j, r in enumerate(owner):
        delta = float(new[j]) - float(base[rows[r]])
        sums[r] += delta
        sums_abs[r] += abs(delta)
        counts[r] += 1
        if r not in worst or abs(delta) > abs(worst[r][0]):
            worst[r] = (delta, j)
    means = [v / c for v, c in zip(sums, counts, strict=True)]
    means_abs = [v / c for v, c in zip(sums_abs, counts, strict=True)]
    top = sorted(worst.items(), key=lambda item: -abs(item[1][0]))[:WORST]
    return {
        "tested": len(rows),
        "counterfactuals": len(flat),
        "mean_delta_logp": sum(means) / len(rows),
        "mean_delta_logp_ci": _interval(means, settings),
        "mean_abs_delta_logp": sum(means_abs) / len(rows),
        "mean_abs_delta_logp_ci": _interval(means_abs, settings),
        "worst": [
            {
                "text": examples[rows[r]].text,
                "counterfactual": flat[j].text,
                "response": examples[rows[r]].response,
                "logp": float(base[rows[r]]),
                "delta_logp": delta,
            }
            for r, (delta, j) in top
        ],  # fmt: skip
    }


def run_generation_audit(
    score: Score, examples: list[Example], lexicons: Sequence[Lexicon], settings: AuditSettings
) -> dict[str, Any]:
    """The counterfactual tests of a generation task: the change in its responses' log-probabilities."""
    base = score(examples)
    return {
        "kind": "generation", "rows": len(examples), "resamples": settings.resamples, "seed": settings.seed,
        "language": settings.language, "threshold": THRESHOLD, "invariance": {},
        "attributes": {
            lexicon.attribute: logprob_test(score, examples, base, lexicon_variants(lexicon), settings)
            for lexicon in lexicons
        },
    }  # fmt: skip


def lexicon_variants(lexicon: Lexicon) -> Callable[[Example], list[Example]]:
    return lambda example: [_with(example, v) for v in lexicon.variants(_texts(example))]


def typo_variants(seed: int) -> Callable[[Example], list[Example]]:
    """One typo per row (CheckList's ``add_typos``): two adjacent letters swapped, seeded by the row's text."""

    def variants(example: Example) -> list[Example]:
        text = example.text
        spots = [i for i in range(len(text) - 1) if text[i].isalpha() and text[i + 1].isalpha()]
        spots = [i for i in spots if text[i] != text[i + 1]]
        if not spots:
            return []
        i = random.Random(f"{seed}:{text}").choice(spots)
        return [replace(example, text=text[:i] + text[i + 1] + text[i] + text[i + 2 :])]

    return variants


def group_metrics(
    groups: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and error rate per group, overall, and the largest gap and smallest ratio across groups."""
    by: dict[str, list[bool]] = {}
    for group, p, r in zip(groups, predictions, references, strict=True):
        by.setdefault(group, []).append(p == r)
    per = {
        g: {"rows": len(v), "accuracy": sum(v) / len(v), "error_rate": 1 - sum(v) / len(v)}
        for g, v in by.items()
    }
    accuracies = [m["accuracy"] for m in per.values()]
    overall = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)
    return {
        "groups": dict(sorted(per.items())),
        "overall": {"rows": len(predictions), "accuracy": overall, "error_rate": 1 - overall},
        "accuracy_difference": max(accuracies) - min(accuracies),
        "accuracy_ratio": min(accuracies) / max(accuracies) if max(accuracies) > 0 else None,
    }


def _groups_of(rows: list[dict[str, object]], column: str, data: str | Path) -> list[str]:
    found = list(dict.fromkeys(k for row in rows for k in row))
    if column not in found:
        raise DataError(f"--group-column '{column}' not found in {data}; columns found: {', '.join(found)}")
    return ["" if row.get(column) is None else str(row.get(column)) for row in rows]


def run_audit(
    proba: Proba,
    labels: Sequence[str],
    examples: list[Example],
    lexicons: Sequence[Lexicon],
    settings: AuditSettings,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every test of the module docstring on ``examples`` scored by ``proba`` (rows -> (N, C) probabilities)."""
    probs = proba(examples)
    report: dict[str, Any] = {"kind": "classification", "rows": len(examples), "threshold": THRESHOLD, "resamples": settings.resamples,
                              "seed": settings.seed, "language": settings.language, "attributes": {},
                              "invariance": {}}  # fmt: skip
    for lexicon in lexicons:
        result = perturbation_test(proba, examples, probs, lexicon_variants(lexicon), labels, settings)
        report["attributes"][lexicon.attribute] = result
    checks = {
        "typos": typo_variants(settings.seed),
        "names": lexicon_variants(name_swapper(settings.language)),
        "locations": lexicon_variants(place_swapper(settings.language)),
    }
    for name, variants in checks.items():
        result = perturbation_test(proba, examples, probs, variants, labels, settings)
        report["invariance"][name] = {
            k: result[k] for k in ("tested", "failure_rate", "failure_rate_ci", "worst")
        }
    if groups is not None:
        references = [e.label for e in examples]
        if any(r is None for r in references):
            raise DataError("--group-column needs every row's label; pass --label-column NAME")
        predictions = [labels[i] for i in probs.argmax(dim=-1).tolist()]
        report["groups"] = group_metrics(groups, predictions, [str(r) for r in references])
    return report


def audit(
    path: str | Path,
    data: str | Path | None,
    columns: Columns | None = None,
    settings: AuditSettings | None = None,
    output: str | Path | None = None,
    model: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Audit the task of a run or task folder on ``data``; writes ``audit.json`` and ``audit.html`` into
    ``output`` (default ``PATH/audit``) and returns the report."""
    from multitune.api import adapter_folder, load
    from multitune.risks.report_html import audit_html
    from multitune.storage import read_adapter_config, write_bytes_atomic, write_json_atomic

    settings = settings or AuditSettings()
    folder = adapter_folder(path)
    kind = read_adapter_config(folder)["task"]["kind"]
    lexicons = lexicons_of(settings.attributes, settings.lexicon, settings.language)
    if settings.canaries:  # before the model is loaded: a run without canaries is one line
        from multitune.risks.canaries import read

        if kind != "generation":
            raise ConfigError(
                "--canaries measures secrets planted in a generation task; this task classifies"
            )
        record = read(path)
    golden_rows = None
    if settings.golden:  # read before the model loads: a bad file costs nothing
        from multitune.risks.golden import read_golden

        golden_rows = read_golden(settings.golden, kind, columns)
    if data is None:  # only the golden set
        if golden_rows is None:
            raise ConfigError("audit needs data to audit (--data FILE) or a golden set (--golden FILE)")
        task = load(path, model=model, device=device)
        report = {"kind": kind, "rows": 0, "attributes": {}, "invariance": {}}
    elif kind == "generation":
        if settings.group_column:
            raise ConfigError("--group-column measures accuracy per group: a classification task's; drop it")
        rows, examples = load_inputs(data, "generation", columns or Columns())
        prompts_only = any(e.response is None for e in examples)
        if prompts_only and not settings.consistency:
            raise DataError(
                f"{data} has no response column; the audit of a generation task scores the data's responses "
                "under each counterfactual prompt: pass --response-column NAME"
            )
        task = load(path, model=model, device=device)
        if prompts_only:  # --consistency needs only prompts: no counterfactual test of the responses
            report = run_generation_audit(_scorer(task, settings.batch_size), [], [], settings)
            report["rows"] = len(examples)
        else:
            report = run_generation_audit(_scorer(task, settings.batch_size), examples, lexicons, settings)
        if settings.consistency:
            from multitune.risks.consistency import run_consistency

            report["consistency"] = run_consistency(
                task, examples, settings.consistency_samples, seed=settings.seed,
                batch_size=max(1, settings.batch_size // 4),
            )  # fmt: skip
    else:
        if settings.consistency:
            raise ConfigError(
                "--consistency samples answers of a generation task; this task classifies: drop --consistency"
            )
        rows, examples = load_inputs(data, "classification", columns or Columns())
        groups = _groups_of(rows, settings.group_column, data) if settings.group_column else None
        task = load(path, model=model, device=device)
        report = run_audit(
            lambda items: task.predict_proba(items, settings.batch_size), task.labels, examples, lexicons,
            settings, groups,
        )  # fmt: skip
    if settings.membership:
        from multitune.risks.memorisation import run_membership

        report["membership"] = run_membership(
            task, path, settings.members, settings.non_members, columns, settings.resamples, settings.seed,
            settings.batch_size,
        )  # fmt: skip
    if settings.canaries:
        from multitune.risks.canaries import measure

        report["canaries"] = measure(task, record, settings.canary_samples, settings.batch_size)
    if golden_rows is not None:
        from multitune.config import TrainConfig
        from multitune.risks.golden import score_golden

        scoring = TrainConfig(max_length=task.max_length, eval_batch_size=settings.batch_size)
        report["golden"] = score_golden(task.bank, task.task, golden_rows, scoring)
    out = Path(output) if output is not None else Path(path) / "audit"
    report = {
        "task": task.task,
        "path": str(path),
        "data": None if data is None else str(data),
        "output": str(out),
        **report,
    }
    write_json_atomic(out / "audit.json", report)
    write_bytes_atomic(out / "audit.html", audit_html(report).encode())
    return report


def _scorer(task: Any, batch_size: int) -> Score:
    from multitune.preference.scoring import sequence_logps

    def score(items: list[Example]) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(
                task.bank, task.task, [e.text for e in items], [e.response or "" for e in items],
                task.max_length, max(1, batch_size // 4),
            ).float().cpu()  # fmt: skip

    return score


def _pct(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    ci = f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else ""
    return f"{value:.1%}{ci}"


def summary_line(name: str, result: dict[str, Any]) -> str:
    """One terminal line for an attribute's counterfactual test."""
    if not result["tested"]:
        return f"{name}: no row mentions a term of its lexicon (0 rows tested); no flip rate"
    if "mean_delta_logp" in result:
        low, high = result["mean_delta_logp_ci"]
        return (
            f"{name}: {result['tested']} rows tested, change in response log-probability "
            f"{result['mean_delta_logp']:+.3f} [{low:+.3f}, {high:+.3f}], mean |change| "
            f"{result['mean_abs_delta_logp']:.3f}"
        )
    return (
        f"{name}: {result['tested']} rows tested, flip rate {_pct(result['flip_rate'], result['flip_rate_ci'])}, "
        f"mean |delta p| {result['mean_abs_delta_p']:.3f} "
        f"[{result['mean_abs_delta_p_ci'][0]:.3f}, {result['mean_abs_delta_p_ci'][1]:.3f}]"
    )


def invariance_line(name: str, result: dict[str, Any]) -> str:
    if not result["tested"]:
        return f"invariance {name}: 0 rows tested"
    return (
        f"invariance {name}: {result['tested']} rows, failure rate "
        f"{_pct(result['failure_rate'], result['failure_rate_ci'])} (label change or |delta p| > {THRESHOLD})"
    )
