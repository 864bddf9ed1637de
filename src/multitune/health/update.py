"""``multitune update TASK_DIR --data NEW``: the task's next version, trained on the new data without
forgetting, scored on every earlier version's test split, promoted only through a gate.

Strategies (``--strategy``): ``replay`` continues the current version on the new rows plus a sample of the
rows it learned before (kept by ``train``, :mod:`multitune.health.kept`; ``--replay`` a share of the earlier
training rows or a count; for classification drawn label by label, and each earlier label the new data lacks
rehearsed with as many rows as the new data has per label, ``--replay-per-label`` to change it: without
that floor a class-incremental update forgets its earlier labels, measured on Banking77, 77 intents in 3
increments, BWT -52.8 points with the share alone, -1.2 with 20 rows per label); ``ewc`` continues it with elastic weight consolidation (Kirkpatrick et al. 2017:
a quadratic pull toward the current weights, weighted by their diagonal Fisher information on the earlier
rows, :mod:`multitune.training.ewc`); ``naive`` continues it on the new rows alone; ``retrain`` trains a
fresh task on every row its versions learned and the new ones (the upper bound, and the slowest).

Forgetting is measured, as Avalanche and Lopez-Paz & Ranzato (2017) define it: ``R[i][j]`` is version i's
metric on data j's test split, backward transfer ``BWT = mean over the earlier data j of R[new][j] - R[j][j]``
(in points: accuracy x 100; for generation tasks the perplexity, and a point is a 1% rise). The gate promotes
the new version when BWT >= -``--max-forgetting`` and its metric on the new data beat the current version's;
otherwise the version is kept, not promoted, and the command exits 3. The code is ours rather than
Avalanche's: its strategies train its own model and benchmark classes; ours train one task of a bank, and
leave every other task of it untouched.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from multitune.bank import MultiTaskModel
from multitune.config import DataConfig, TrainConfig
from multitune.data import Example, Splits, task_kind
from multitune.errors import ConfigError, MultituneError
from multitune.health import kept
from multitune.health.versions import (
    DATA,
    VERSION_FILE,
    current_version,
    data_folder,
    folder_bytes,
    read_version,
    set_current,
    task_root,
    version_adapter,
    version_folder,
    version_numbers,
    write_version,
)
from multitune.storage import atomic_dir, load_adapter, output_lock, read_adapter_config, save_adapter

STRATEGIES = ("replay", "ewc", "naive", "retrain")
PROMOTE = ("auto", "always", "never")
NOT_PROMOTED = 3  # the exit status of an update the gate refused
FISHER_ROWS = 128  # earlier rows the Fisher is estimated on (at most): one backward each (230 s for 500 on MiniLM, 2 CPU cores)


@dataclass
class UpdateConfig:
    strategy: str = field(
        default="replay",
        metadata={"help": "replay, ewc, naive (plain continuation) or retrain (from scratch)"},
    )
    replay: float = field(
        default=0.05,
        metadata={"help": "earlier rows rehearsed: a share of the earlier training rows (<= 1) or a count"},
    )
    replay_per_label: int | None = field(
        default=None,
        metadata={
            "help": "classification: rows rehearsed at least of each earlier label the new data lacks "
            "(default: as many as the new data has per label; 0: only the --replay share)"
        },
    )
    replay_data: str | None = field(
        default=None,
        metadata={"help": "earlier rows to rehearse (and EWC's Fisher) instead of the kept sample"},
    )
    add_labels: bool = field(
        default=False, metadata={"help": "let the new data bring new labels (the head grows)"}
    )
    max_forgetting: float = field(
        default=1.0, metadata={"help": "the gate: promote only when BWT >= -this many points"}
    )
    max_golden_drop: float = field(
        default=1.0,
        metadata={
            "help": "the gate: promote only when the golden set's score (train --golden, or --golden) falls by "
            "at most this many points"
        },
    )
    promote: str = field(default="auto", metadata={"help": "auto (the gate decides), always or never"})
    ewc_strength: float | None = field(
        default=None, metadata={"help": "EWC's penalty weight (default: multitune.training.ewc's)"}
    )
    general_data: str | None = field(
        default=None,
        metadata={
            "help": "generation: general text whose perplexity shows lost abilities (default: built in)"
        },
    )

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not '{self.strategy}'")
        if self.promote not in PROMOTE:
            raise ConfigError(f"--promote must be one of {', '.join(PROMOTE)}, not '{self.promote}'")
        if not (self.replay > 0 and math.isfinite(self.replay)) or (self.replay > 1 and self.replay % 1):
            raise ConfigError(f"--replay must be a share in (0, 1] or a whole count, not {self.replay}")
        if self.replay_per_label is not None and self.replay_per_label < 0:
            raise ConfigError(f"--replay-per-label must be 0 or more rows, not {self.replay_per_label}")
        if not (self.max_forgetting >= 0 and math.isfinite(self.max_forgetting)):
            raise ConfigError(f"--max-forgetting must be 0 or more points, not {self.max_forgetting}")
        if not (self.max_golden_drop >= 0 and math.isfinite(self.max_golden_drop)):
            raise ConfigError(f"--max-golden-drop must be 0 or more points, not {self.max_golden_drop}")


# ---- what a task root knows of its versions ------------------------------------------------------------------
def _run_settings(root: Path) -> dict[str, Any]:
    """The run's config.yaml (a train run folder), {} for a bank's task folder."""
    file = root / "config.yaml"
    if not file.is_file():
        return {}
    try:
        settings = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{file} is not valid YAML ({type(error).__name__}); fix or remove it") from error
    return settings if isinstance(settings, dict) else {}


def _first_record(root: Path, kind: str) -> dict[str, Any]:
    """Version 1's record, from what train kept (data/source.json) or, for older runs, its config.yaml."""
    source = kept.read_source(data_folder(root, 1)) or {}
    data = source.get("data") or _run_settings(root).get("data")
    return {
        "version": 1,
        "parent": None,
        "strategy": "train",
        "data": data,
        "examples": source.get("examples", {}),
        "kind": kind,
        "scores": {},
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(version_adapter(root, 1).stat().st_mtime)),
    }


def records_of(root: Path, kind: str) -> dict[int, dict[str, Any]]:
    records = {n: read_version(root, n) for n in version_numbers(root)}
    if not records[1]:
        records[1] = _first_record(root, kind)
    return records


def lineage(records: dict[int, dict[str, Any]], number: int) -> list[int]:
    """``number`` and its ancestors, oldest first (what that version has learned)."""
    chain: list[int] = []
    at: int | None = number
    while at is not None and at in records and at not in chain:
        chain.append(at)
        at = records[at].get("parent")
    return chain[::-1]


def _data_config(data: Any, where: str) -> DataConfig:
    if not isinstance(data, dict) or not data.get("data"):
        raise ConfigError(f"{where} records no data file, so its rows cannot be read again")
    fields = set(DataConfig.__dataclass_fields__)
    return DataConfig(**{k: v for k, v in data.items() if k in fields})


def _reread(record: dict[str, Any], number: int, kind: str) -> Splits:
    """Version ``number``'s splits, read again from the data file its record names (MultituneError if gone)."""
    return _data_config(record.get("data"), f"version {number}").splits(task_kind(kind))


def _test_split(root: Path, number: int, record: dict[str, Any], kind: str) -> list[Example] | None:
    """Version ``number``'s test split: kept in its data/ folder, or re-read from its recorded data file."""
    file = data_folder(root, number) / kept.TEST_FILE
    if file.is_file():
        return kept.read_examples(file)
    try:
        return _reread(record, number, kind).test or None
    except MultituneError:  # the file is gone or changed: that split is not measured
        return None


def _earlier_rows(
    root: Path, records: dict[int, dict[str, Any]], chain: list[int], kind: str
) -> list[Example]:
    """The kept replay samples of ``chain``'s versions, or, where one kept none, its training split re-read."""
    rows: list[Example] = []
    for number in chain:
        file = data_folder(root, number) / kept.REPLAY_FILE
        if file.is_file():
            rows += kept.read_examples(file)
            continue
        try:
            rows += _reread(records[number], number, kind).train
        except MultituneError as error:
            raise ConfigError(
                f"version {number} of {root} kept no rows to rehearse (trained with --no-keep-replay or before "
                "updates existed) and its data file cannot be read; pass --replay-data FILE with earlier rows, "
                "or use --strategy naive"
            ) from error
    return rows


def _all_training_rows(
    root: Path, records: dict[int, dict[str, Any]], chain: list[int], kind: str
) -> list[Example]:
    """Every row ``chain``'s versions trained on, re-read from their recorded data files (retrain)."""
    rows: list[Example] = []
    for number in chain:
        data = records[number].get("data")
        try:
            rows += _reread(records[number], number, kind).train
        except MultituneError as error:
            raise ConfigError(
                f"--strategy retrain reads every earlier version's data again, but version {number}'s "
                f"({(data or {}).get('data') if isinstance(data, dict) else None}) cannot be read: {error}; "
                "restore the file, or use --strategy replay"
            ) from error
    return rows


# ---- scoring ------------------------------------------------------------------------------------------------------
def score(bank: MultiTaskModel, task: str, examples: list[Example], config: TrainConfig) -> float:
    """Accuracy (classification) or perplexity (generation) on ``examples``."""
    from multitune.training.evaluate import evaluate, predict_labels

    if bank.tasks[task].kind == "classification":  # a row of a label the version does not know is an error
        predicted = predict_labels(bank, task, examples, config.max_length, config.eval_batch_size)
        return sum(p == ex.label for p, ex in zip(predicted, examples, strict=True)) / len(examples)
    metrics = evaluate(
        bank, task, examples, config.max_length, config.eval_batch_size, config.max_new_tokens, generate=False
    )
    return float(metrics["perplexity"])


def points(kind: str, new: float, old: float) -> float:
    """``new`` against ``old`` in points: +1 is one accuracy point better, or a perplexity 1% lower."""
    if kind == "classification":
        return 100.0 * (new - old)
    return -100.0 * (new / old - 1.0) if old > 0 else 0.0


def backward_transfer(
    kind: str, matrix: dict[int, dict[int, float]], new: int, earlier: list[int]
) -> float | None:
    """BWT of version ``new`` over the data of ``earlier`` versions, in points (None: nothing to measure)."""
    pairs = [(matrix[new][j], matrix[j][j]) for j in earlier if j in matrix[new] and j in matrix.get(j, {})]
    if not pairs:
        return None
    return sum(points(kind, a, b) for a, b in pairs) / len(pairs)


def matrix_of(records: dict[int, dict[str, Any]]) -> dict[int, dict[int, float]]:
    return {n: {int(j): float(v) for j, v in (r.get("scores") or {}).items()} for n, r in records.items()}


# ---- the update ---------------------------------------------------------------------------------------------------
def _train_config(root: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The run's own training settings (its config.yaml), then the flags given."""
    saved = _run_settings(root).get("train")
    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in (saved if isinstance(saved, dict) else {}).items() if k in fields}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def _new_labels(splits: Splits, labels: list[str], add: bool) -> list[str]:
    new = [label for label in splits.labels if label not in labels]
    if new and not add:
        shown = ", ".join(repr(x) for x in new[:10]) + (f" and {len(new) - 10} more" if len(new) > 10 else "")
        raise ConfigError(
            f"the new data has labels the task does not know: {shown}; pass --add-labels to grow the task's "
            "labels, or drop those rows"
        )
    return new


def _bank_of(
    meta: dict[str, Any],
    adapter: Path | None,
    task: str,
    labels: list[str],
    device: str | None,
    seed: int,
    parent: Path | None = None,
) -> MultiTaskModel:
    """A bank holding ``task``: the version in ``adapter``, or (None) a fresh task of the same method (on the
    same component, for a stacked task: ``meta`` is the adapter document of ``parent``)."""
    from multitune.methods import get_method
    from multitune.models import load_base

    bank = MultiTaskModel(load_base(meta["base_model"], device=device, quantize=meta.get("base_quantize")))
    if adapter is not None:
        load_adapter(bank, adapter, task)
        return bank
    spec = meta["task"]
    on = None
    if "stack_on" in meta and parent is not None:  # retrained on what the old version stood on
        from multitune.compose.stack import load_component

        on = load_component(bank, meta["stack_on"], parent, task)
    torch.manual_seed(seed)
    config = get_method(spec["method"]).config_class(**spec["config"])
    bank.add_task(task, spec["kind"], spec["method"], config, labels, spec.get("pooling"), None, on)
    return bank


def _rehearsal(
    upd: UpdateConfig, root: Path, records: dict[int, dict[str, Any]], chain: list[int], kind: str
) -> tuple[list[Example], int]:
    """(the earlier rows to draw replay and Fisher from, the number of earlier training rows)."""
    if upd.replay_data:
        from multitune.data import Columns, load_examples

        pool = load_examples(upd.replay_data, task_kind(kind), Columns())
        return pool, len(pool)
    earlier = sum(int((records[n].get("examples") or {}).get("train", 0)) for n in chain)
    pool = _earlier_rows(root, records, chain, kind)
    if not pool:
        raise ConfigError(
            "no earlier rows to rehearse; pass --replay-data FILE with earlier rows, or use --strategy naive"
        )
    return pool, earlier or len(pool)


def update(
    path: str | Path,
    upd: UpdateConfig,
    data: DataConfig,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, score and write the task's next version; promote it when the gate (or ``--promote``) says so.

    Returns the summary the command prints (also the new version's ``version.json``)."""
    upd.validate()
    root = task_root(path)
    with output_lock(root, "multitune update"):
        return _update(root, upd, data, overrides or {}, device, progress)


def _update(
    root: Path,
    upd: UpdateConfig,
    data: DataConfig,
    overrides: dict[str, Any],
    device: str | None,
    progress: bool,
) -> dict[str, Any]:
    from multitune.training.train import train

    parent = current_version(root)
    parent_adapter = version_adapter(root, parent)
    meta = read_adapter_config(parent_adapter)
    kind, task, labels = meta["task"]["kind"], meta["task"]["name"], list(meta["task"].get("labels") or [])
    records = records_of(root, kind)
    number = max(records) + 1
    config = _train_config(root, overrides)
    splits = data.splits(task_kind(kind), labels)
    added = _new_labels(splits, labels, upd.add_labels) if kind == "classification" else []
    chain = lineage(records, parent)
    tests = {n: t for n in records if (t := _test_split(root, n, records[n], kind))}
    tests[number] = splits.test
    if not splits.test:
        raise ConfigError(
            "the new data has no test split; give --test-data FILE or a --split with a test share"
        )

    from multitune.risks import golden as gold

    given = gold.read_golden(data.golden, kind, data.columns()) if data.golden else None  # before any model
    golden_rows = given if given is not None else gold.kept_golden(root)
    bank = _bank_of(meta, parent_adapter, task, labels, device, config.seed)
    golden_before = gold.score_golden(bank, task, golden_rows, config) if golden_rows else None
    matrix = matrix_of(records)
    for j, rows in tests.items():  # the current version on every test split it was not scored on yet
        if j not in matrix[parent]:
            matrix[parent][j] = score(bank, task, rows, config)
    general_before = _general(bank, task, upd, config) if kind == "generation" else None
    started = time.perf_counter()  # the strategy's cost: its rows, its Fisher, its training (not the scoring)
    # EWC's Fisher and anchor are the current version's, on its own labels: taken before the head grows
    ewc_parts = (
        _ewc_parts(bank, task, root, records, chain, kind, upd, config) if upd.strategy == "ewc" else None
    )
    if added:
        bank.grow_labels(task, added)
    rows = list(splits.train)
    penalty = None
    replayed = 0
    if upd.strategy == "replay":
        pool, earlier = _rehearsal(upd, root, records, chain, kind)
        want = upd.replay if upd.replay > 1 else math.ceil(upd.replay * earlier)
        if kind == "classification":
            present = {ex.label or "" for ex in splits.train}
            floor = upd.replay_per_label
            if floor is None:  # class-balanced: a missing label as many rows as a new label has, on average
                floor = math.ceil(len(splits.train) / len(present))
            missing = {ex.label or "" for ex in pool} - present
            replay_rows = kept.sample_by_label(pool, int(want), config.seed + number, floor, missing)
        else:
            replay_rows = kept.sample(pool, int(want), config.seed + number)
        replayed = len(replay_rows)
        rows += replay_rows
    elif ewc_parts is not None:
        from multitune.training import ewc

        anchor, fisher = ewc_parts
        kwargs = {} if upd.ewc_strength is None else {"strength": upd.ewc_strength}
        penalty = ewc.ewc_penalty(bank, task, anchor, fisher, **kwargs)
    elif upd.strategy == "retrain":
        rows = _all_training_rows(root, records, chain, kind) + rows
        bank = _bank_of(meta, None, task, labels + added, device, config.seed, parent_adapter)

    result = train(bank, task, rows, splits.validation, config, progress=progress, penalty=penalty)
    seconds = time.perf_counter() - started
    scores = {j: score(bank, task, t, config) for j, t in tests.items()}
    matrix[number] = scores
    general_after = _general(bank, task, upd, config) if kind == "generation" else None
    bwt = backward_transfer(kind, matrix, number, chain)
    gain = points(kind, scores[number], matrix[parent][number]) if number in matrix[parent] else None
    golden = None
    if golden_rows and golden_before is not None:
        after = gold.score_golden(bank, task, golden_rows, config)
        golden = {
            "metric": after["metric"],
            "rows": after["rows"],
            "before": golden_before["score"],
            "after": after["score"],
            "change": 100.0 * (after["score"] - golden_before["score"]),
            "max_drop": upd.max_golden_drop,
            "detail": {"before": golden_before, "after": after},
        }
    promoted, why = _gate(upd, bwt, gain, None if golden is None else golden["change"])
    seen = [j for j in [*chain, number] if j in scores]  # accuracy on every row seen so far (by test rows)
    all_seen = sum(scores[j] * len(tests[j]) for j in seen) / sum(len(tests[j]) for j in seen)

    record = {
        "version": number,
        "parent": parent,
        "strategy": upd.strategy,
        "data": asdict(data),
        "examples": {
            "train": len(splits.train),
            "validation": len(splits.validation),
            "test": len(splits.test),
            "replayed": replayed,
            "trained_on": len(rows),
        },
        "labels_added": added,
        "kind": kind,
        "metric": "accuracy" if kind == "classification" else "perplexity",
        "scores": {str(j): v for j, v in scores.items()},
        "bwt": bwt,
        "gain": gain,
        "all_seen": all_seen,
        "golden": golden,
        "general_perplexity": {"before": general_before, "after": general_after}
        if kind == "generation"
        else None,
        "train_seconds": round(seconds, 2),
        "steps": result.steps,
        "learned": result.problem is None,
        "problem": result.problem,
        "gate": {
            "promoted": promoted,
            "reason": why,
            "max_forgetting": upd.max_forgetting,
            "rule": upd.promote,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write(root, number, bank, task, splits, data, config, record, records)
    _rescore_parent(root, records, parent, matrix)
    if given is not None:  # the task's golden set from now on, for this and every later update
        gold.save_golden(root, given)
    if promoted:
        set_current(root, number)
    record["size_bytes"] = folder_bytes(version_folder(root, number))
    record["matrix"] = {str(i): {str(j): v for j, v in row.items()} for i, row in matrix.items()}
    record["current"] = number if promoted else parent
    return record


def _gate(
    upd: UpdateConfig, bwt: float | None, gain: float | None, golden_change: float | None = None
) -> tuple[bool, str]:
    if upd.promote == "always":
        return True, "--promote always"
    if upd.promote == "never":
        return False, "--promote never"
    if bwt is None:
        return False, "no earlier test split to measure forgetting on (promote it with multitune promote)"
    if bwt < -upd.max_forgetting:
        return (
            False,
            f"it forgot {-bwt:.2f} points on earlier data (BWT), more than --max-forgetting {upd.max_forgetting:g}",
        )
    if golden_change is not None and golden_change < -upd.max_golden_drop:
        return (
            False,
            f"its golden-set score fell {-golden_change:.2f} points, more than --max-golden-drop "
            f"{upd.max_golden_drop:g}",
        )
    if gain is None or gain <= 0:
        shown = "unknown" if gain is None else f"{gain:+.2f} points"
        return False, f"it did not improve on the new data ({shown} against the current version)"
    return True, f"BWT {bwt:+.2f} points >= -{upd.max_forgetting:g}, {gain:+.2f} points on the new data"


def _ewc_parts(
    bank: MultiTaskModel,
    task: str,
    root: Path,
    records: dict[int, dict[str, Any]],
    chain: list[int],
    kind: str,
    upd: UpdateConfig,
    config: TrainConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(anchor, Fisher) of the current version: its weights, and their Fisher on up to FISHER_ROWS earlier rows."""
    from multitune.training import ewc

    pool, _ = _rehearsal(upd, root, records, chain, kind)
    rows = kept.sample(pool, FISHER_ROWS, config.seed)
    fisher = ewc.fisher_diagonal(bank, task, rows, config.max_length, config.eval_batch_size)
    anchor = {k: p.detach().clone() for k, p in bank.task_parameters(task).items()}
    return anchor, fisher


def _general(bank: MultiTaskModel, task: str, upd: UpdateConfig, config: TrainConfig) -> float:
    from multitune.health.general import general_perplexity, read_general

    return general_perplexity(bank, task, read_general(upd.general_data))


def _write(
    root: Path,
    number: int,
    bank: MultiTaskModel,
    task: str,
    splits: Splits,
    data: DataConfig,
    config: TrainConfig,
    record: dict[str, Any],
    records: dict[int, dict[str, Any]],
) -> None:
    """The version's folder, whole or not at all: adapter, drift profile, kept data, version.json."""
    from multitune.health.profile import save_task_profile

    if not read_version(root, 1):
        write_version(root, 1, records[1])  # version 1's record, first written by the first update
    with atomic_dir(version_folder(root, number)) as tmp:
        save_adapter(bank, task, tmp, extra={"metrics": {"scores": record["scores"]}, "task_version": number})
        save_task_profile(
            bank, task, tmp, splits.validation, splits.train, config.max_length, config.eval_batch_size
        )
        kept.keep(tmp / DATA, splits, asdict(data), config.seed + number, data.keep_replay)
        (tmp / VERSION_FILE).write_text(json.dumps(record, indent=2))


def _rescore_parent(
    root: Path, records: dict[int, dict[str, Any]], parent: int, matrix: dict[int, dict[int, float]]
) -> None:
    """The current version's scores on the new data (and any split it lacked), in its version.json."""
    record = read_version(root, parent) or records[parent]
    record["scores"] = {str(j): v for j, v in sorted(matrix[parent].items())}
    write_version(root, parent, record)
