"""``multitune merge``: merge tasks (:mod:`multitune.compose.merge`), write OUT as a bank of one run folder per
constituent (the merged body with that task's own head), and measure what each task kept.

Retention is measured, never assumed: every constituent is scored alone and merged on the same rows (its kept
test split, or ``--test NAME=FILE``) in one bank over one base, and the normalised retention is merged / alone
of the task's metric (accuracy, or ROUGE-L for generation). ``--search N`` chooses the weights (and the density
of ties/dare) by Optuna's TPE over N trials on each constituent's validation split (kept by ``train`` since
golden sets landed, or ``--validation NAME=FILE``), maximising the mean normalised retention: the test rows
are never seen by the search.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from multitune.compose.merge import (
    Constituent,
    MergeSettings,
    merge_bodies,
    read_constituents,
    tensor_bytes,
)
from multitune.data import Example
from multitune.errors import ConfigError
from multitune.health.kept import VALIDATION_FILE

MERGE_RECORD = "merge.json"


def kept_rows(c: Constituent, file: str) -> list[Example] | None:
    """A constituent's kept rows (``data/test.jsonl`` or ``data/validation.jsonl`` of its current version)."""
    from multitune.health.kept import read_examples
    from multitune.health.versions import current_version, data_folder, task_root

    try:
        root = task_root(c.folder)
    except ConfigError:
        return None
    for folder in (data_folder(root, current_version(root)), data_folder(root, 1)):
        if (folder / file).is_file():
            return read_examples(folder / file)
    return None


def _rows(c: Constituent, given: Mapping[str, str], file: str, flag: str) -> list[Example]:
    from multitune.data import Columns, load_examples, task_kind

    if c.name in given:
        return load_examples(given[c.name], task_kind(c.meta["task"]["kind"]), Columns())
    rows = kept_rows(c, file)
    if not rows:
        raise ConfigError(
            f"task '{c.name}' ({c.folder}) keeps no {file.split('.')[0]} split; pass {flag} {c.name}=FILE"
        )
    return rows


def _max_length(c: Constituent) -> int:
    from multitune.serve.engine import trained_max_length

    return trained_max_length(c.folder)


def primary_metric(kind: str) -> str:
    return "accuracy" if kind == "classification" else "rouge_l"


class Scorer:
    """One base holding every constituent alone (``c0``, ``c1``, ...) and the merged task of each (``m0``, ...)."""

    def __init__(self, tasks: Sequence[Constituent], device: str | None, batch_size: int) -> None:
        from multitune.bank import MultiTaskModel
        from multitune.models import load_base
        from multitune.storage import load_adapter

        meta = tasks[0].meta
        base = load_base(str(meta["base_model"]), device=device, quantize=meta.get("base_quantize"))
        self.bank = MultiTaskModel(base)
        self.tasks, self.batch_size = list(tasks), batch_size
        for i, c in enumerate(tasks):
            load_adapter(self.bank, c.folder, f"c{i}")

    def set_merged(self, body: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        from multitune.methods import get_method

        for i, c in enumerate(self.tasks):
            name = f"m{i}"
            if name in self.bank.tasks:
                self.bank.remove_task(name)
            spec = self.bank.tasks[f"c{i}"]
            method = get_method(c.method)
            self.bank.add_task(
                name, spec.kind, c.method, method.config_class(**config), spec.labels, spec.pooling
            )
            self.bank.load_task_state_dict(name, {**body, **c.head})

    def per_row(self, task: str, i: int, rows: list[Example]) -> list[float]:
        """Each row's score: 1/0 for a right/wrong label, or the answer's ROUGE-L (the metric is their mean)."""
        from multitune.metrics import rouge_l_sentence
        from multitune.training.evaluate import generate_texts, predict_labels

        c = self.tasks[i]
        if c.meta["task"]["kind"] == "classification":
            predicted = predict_labels(self.bank, task, rows, _max_length(c), self.batch_size)
            return [float(p == r.label) for p, r in zip(predicted, rows, strict=True)]
        answers = generate_texts(self.bank, task, rows, _max_length(c))
        return [rouge_l_sentence(a, r.response or "") for a, r in zip(answers, rows, strict=True)]

    def score(self, task: str, i: int, rows: list[Example], generate: bool = True) -> float:
        from multitune.training.evaluate import evaluate

        c = self.tasks[i]
        kind = c.meta["task"]["kind"]
        metrics = evaluate(self.bank, task, rows, _max_length(c), self.batch_size, generate=generate)
        key = primary_metric(kind) if generate or kind == "classification" else "loss"
        value = float(metrics[key])
        return -value if key == "loss" else value


def _retention(alone: float, merged: float) -> float | None:
    return merged / alone if alone > 0 else None


def search_settings(
    tasks: Sequence[Constituent], settings: MergeSettings, scorer: Scorer, rows: Sequence[list[Example]],
    trials: int, progress: bool = True,
) -> tuple[MergeSettings, dict[str, Any]]:  # fmt: skip
    """Optuna TPE over the weights (0 to 1.5 each) and, for ties/dare, the density (0.1 to 1): the mean normalised
    retention on the validation rows."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    alone = [scorer.score(f"c{i}", i, r) for i, r in enumerate(rows)]
    sparse = settings.method in ("ties", "dare_linear", "dare_ties")

    def objective(trial: optuna.Trial) -> float:
        weights = tuple(trial.suggest_float(f"w_{c.name}", 0.0, 1.5) for c in tasks)
        density = trial.suggest_float("density", 0.1, 1.0) if sparse else settings.density
        body, config, _ = merge_bodies(tasks, replace(settings, weights=weights, density=density))
        scorer.set_merged(body, config)
        kept = [
            _retention(a, scorer.score(f"m{i}", i, r))
            for i, (a, r) in enumerate(zip(alone, rows, strict=True))
        ]
        value = sum(k or 0.0 for k in kept) / len(kept)
        if progress:
            shown = ", ".join(f"{w:.2f}" for w in weights)
            print(f"  trial {trial.number}: weights {shown}" + (f", density {density:.2f}" if sparse else "")
                  + f" -> mean retention {value:.3f}", flush=True)  # fmt: skip
        return value

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=settings.seed))
    start = {f"w_{c.name}": 1.0 for c in tasks} | ({"density": settings.density} if sparse else {})
    study.enqueue_trial(start)  # the defaults are the first trial: a search never ends below them
    study.optimize(objective, n_trials=trials)
    best = study.best_params
    chosen = replace(
        settings,
        weights=tuple(best[f"w_{c.name}"] for c in tasks),
        density=best.get("density", settings.density),
    )
    return chosen, {
        "trials": trials,
        "best_validation_retention": study.best_value,
        "validation_alone": alone,
    }


def _write_task(out: Path, c: Constituent, body: dict[str, torch.Tensor], config: dict[str, Any],
                record: dict[str, Any]) -> None:  # fmt: skip
    """OUT/NAME as a run folder: adapter/ (the merged body + this task's head), the run's config.yaml and kept
    data when it had them (so eval, serve and update read it like the run it came from)."""
    from safetensors.torch import save_file

    from multitune.storage import CONFIG_FILE, FORMAT, WEIGHTS_FILE, atomic_dir

    meta = json.loads(json.dumps(c.meta))
    meta["task"] = {**meta["task"], "name": c.name, "config": config}
    meta["merged"] = record
    meta.pop("metrics", None)  # the constituent's scores are not the merged task's
    with atomic_dir(out / c.name) as tmp:
        adapter = tmp / "adapter"
        adapter.mkdir()
        state = {k: v.contiguous() for k, v in {**body, **c.head}.items()}
        save_file(state, str(adapter / WEIGHTS_FILE), metadata={"format": FORMAT})
        (adapter / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        run = c.folder.parent if c.folder.name == "adapter" else None
        if run is not None and (run / "config.yaml").is_file():
            shutil.copy2(run / "config.yaml", tmp / "config.yaml")
        if run is not None and (run / "data").is_dir():
            shutil.copytree(run / "data", tmp / "data")


def merge_tasks(
    paths: Sequence[str | Path],
    settings: MergeSettings,
    output: str | Path,
    names: Sequence[str] | None = None,
    test: Mapping[str, str] | None = None,
    validation: Mapping[str, str] | None = None,
    search: int = 0,
    score: bool = True,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Merge the tasks of ``paths`` into the bank ``output``; returns (and writes as OUT/merge.json) the record,
    with the retention table unless ``score`` is False."""
    from multitune.metrics import bootstrap_interval
    from multitune.storage import describe_folder, output_lock, write_json_atomic

    tasks = read_constituents(paths, names)
    body, config, record = merge_bodies(tasks, settings)  # every refusal before a model loads
    test, validation = dict(test or {}), dict(validation or {})
    for flag, given in (("--test", test), ("--validation", validation)):
        unknown = sorted(set(given) - {c.name for c in tasks})
        if unknown:
            raise ConfigError(
                f"{flag} names {', '.join(unknown)}, not a task being merged ({', '.join(c.name for c in tasks)})"
            )
    test_rows = [_rows(c, test, "test.jsonl", "--test") for c in tasks] if score else []
    search_rows = [_rows(c, validation, VALIDATION_FILE, "--validation") for c in tasks] if search else []
    out = Path(output)
    with output_lock(out, "multitune merge"):
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"output folder {out} already exists and is {describe_folder(out)}; choose another --output"
            )
        scorer = Scorer(tasks, device, batch_size) if (score or search) else None
        if search and scorer is not None:
            settings, found = search_settings(tasks, settings, scorer, search_rows, search, progress)
            body, config, record = merge_bodies(tasks, settings)
            record["search"] = found
        for c in tasks:
            _write_task(out, c, body, config, record)
        constituents = sum(
            tensor_bytes({k: v for k, v in c.state.items() if not k.startswith("head.")}) for c in tasks
        )
        heads = sum(tensor_bytes(c.head) for c in tasks)
        record["storage"] = {
            "constituent_bodies_bytes": constituents,
            "merged_body_bytes": tensor_bytes(body),
            "heads_bytes": heads,
            "saved_share": 1.0 - tensor_bytes(body) / constituents if constituents else 0.0,
        }
        if score and scorer is not None:
            scorer.set_merged(body, config)
            table = []
            for i, (c, rows) in enumerate(zip(tasks, test_rows, strict=True)):
                own, mixed = scorer.per_row(f"c{i}", i, rows), scorer.per_row(f"m{i}", i, rows)
                alone, merged = sum(own) / len(own), sum(mixed) / len(mixed)
                low, high = bootstrap_interval(
                    [m - o for m, o in zip(mixed, own, strict=True)], seed=settings.seed
                )
                table.append({
                    "task": c.name, "metric": primary_metric(c.meta["task"]["kind"]), "rows": len(rows),
                    "alone": alone, "merged": merged, "retention": _retention(alone, merged),
                    "change_points": 100 * (merged - alone), "change_ci_points": [100 * low, 100 * high],
                })  # fmt: skip
            record["retention"] = table
        write_json_atomic(out / MERGE_RECORD, record)
    return record


def retention_lines(record: dict[str, Any]) -> list[str]:
    """The terminal table of a merge: each task merged vs alone, and the storage."""
    lines = []
    if "retention" in record:
        lines.append(
            f"{'task':<20} {'metric':<9} {'rows':>5} {'alone':>7} {'merged':>7} {'retention':>9}  "
            "change in points [paired 95% CI]"
        )
        for row in record["retention"]:
            kept = "n/a" if row["retention"] is None else f"{row['retention']:.1%}"
            low, high = row["change_ci_points"]
            lines.append(
                f"{row['task']:<20} {row['metric']:<9} {row['rows']:>5} {row['alone']:>7.4f} {row['merged']:>7.4f} "
                f"{kept:>9}  {row['change_points']:+.2f} [{low:+.2f}, {high:+.2f}]"
            )
    s = record["storage"]
    mib = 1024 * 1024
    lines.append(
        f"storage: {len(record['tasks'])} task bodies {s['constituent_bodies_bytes'] / mib:.2f} MiB -> one merged "
        f"body {s['merged_body_bytes'] / mib:.2f} MiB (rank {record.get('rank', '-')}; {s['saved_share']:.0%} less) "
        f"+ heads {s['heads_bytes'] / mib:.3f} MiB"
    )
    if "energy_kept" in record:
        e = record["energy_kept"]
        lines.append(
            f"re-factorised to rank {record['rank']}: {e['mean']:.1%} of the merged update's energy kept (least {e['min']:.1%} in a layer)"
        )
    return lines
