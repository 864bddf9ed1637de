"""``multitune monitor`` and ``multitune profile`` as library functions: drift of a file of new inputs against
each task's profile, without a server (batch scoring jobs), and profiles for adapters trained before profiles
existed.

:func:`monitor_file` runs the file's rows once through every task of a run or bank (the forward the server
would run), and applies the live monitor's tests (:func:`multitune.health.live.drift_tests`) to the whole
file as one window: the same statistics, the same Bonferroni family p-value and alarm rule. MMD compares at
most ``MMD_ROWS`` rows of the file (a seeded sample): its permutations cost the square of the rows, and a
sample of 500 already detects any shift a window of 200 does. The report is ``report.json`` plus a
self-contained ``report.html`` (:mod:`multitune.health.report_html`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.data import Columns, Example, load_inputs
from multitune.errors import ConfigError, MultituneError
from multitune.health.live import ALPHA, PERMUTATIONS, drift_tests, family_p_value, score_of
from multitune.health.profile import Profile, build_profile, load_profile, observe_examples, save_profile
from multitune.storage import output_lock, read_adapter_config, write_bytes_atomic, write_json_atomic

MMD_ROWS = 500


@dataclass
class Loaded:
    """The tasks of a run or bank on their bases: task name -> (bank, adapter folder, max_length)."""

    tasks: dict[str, tuple[MultiTaskModel, Path, int]]


def load_tasks(path: str | Path, model: str | None = None, device: str | None = None) -> Loaded:
    """Every task under ``path`` (a run, adapter, bank or folder of runs), adapters of one base sharing it."""
    from multitune.methods import get_method
    from multitune.models import load_base
    from multitune.serve.engine import find_adapters, trained_max_length
    from multitune.storage import load_adapter

    found = find_adapters(path)
    banks: dict[str, MultiTaskModel] = {}
    tasks: dict[str, tuple[MultiTaskModel, Path, int]] = {}
    for name, adapter in found.items():
        meta = read_adapter_config(adapter)
        source, quantize = model or meta["base_model"], meta.get("base_quantize")
        if get_method(meta["task"]["method"]).changes_base:  # the task owns its weights: a bank of its own
            bank = MultiTaskModel(load_base(source, device=device))
        else:
            key = f"{source} ({quantize})" if quantize else source
            bank = banks.get(key) or banks.setdefault(
                key, MultiTaskModel(load_base(source, device=device, quantize=quantize))
            )
        spec = load_adapter(bank, adapter, name)
        tasks[spec.name] = (bank, adapter, trained_max_length(adapter))
    return Loaded(tasks)


def profile_command(task_dir: str | Path) -> str:
    """The command that builds the profile of the task in ``task_dir`` (what error messages advise)."""
    return f"multitune profile {task_dir} --data FILE"


def build_missing_profile(
    run: str | Path,
    data: str | Path,
    columns: Columns | None = None,
    model: str | None = None,
    device: str | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
) -> tuple[str, Path, Profile]:
    """Build and save the profile of the one task in ``run`` from ``data`` (labelled rows calibrate it)."""
    from multitune.serve.engine import find_adapters

    found = find_adapters(run)
    if len(found) != 1:
        shown = ", ".join(str(p) for p in list(found.values())[:3])
        raise ConfigError(
            f"{run} holds {len(found)} tasks ({shown}); give one task's folder, e.g. "
            f"{profile_command(next(iter(found.values())))}"
        )
    kind = read_adapter_config(next(iter(found.values())))["task"]["kind"]
    # the user's file first: it fails before the model loads
    _, examples = load_inputs(data, kind, columns or Columns())
    loaded = load_tasks(run, model, device)
    (name, (bank, adapter, trained)), *_ = loaded.tasks.items()
    with output_lock(adapter, "multitune profile"):
        profile = build_profile(bank, name, examples, max_length or trained, batch_size=batch_size)
        save_profile(profile, adapter)
    return name, adapter, profile


def task_report(
    profile: Profile,
    bank: MultiTaskModel,
    task: str,
    examples: list[Example],
    max_length: int,
    batch_size: int = 64,
    alpha: float = ALPHA,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """The drift statistics of ``examples`` against ``profile``, in the shape of the live monitor's state."""
    seen = observe_examples(bank, task, examples, max_length, batch_size)
    generator = torch.Generator().manual_seed(seed)
    features = predicted = confidences = estimated = None
    if seen.pooled is not None and profile.has_features:
        projected = profile.project(seen.pooled)
        keep = torch.randperm(projected.shape[0], generator=generator)[:MMD_ROWS]
        features = projected[keep]
    probs = seen.probabilities
    report: dict[str, Any] = {"monitored": True, "kind": profile.kind, "rows": len(examples)}
    if probs is not None and profile.label_counts.numel():
        top = probs.max(1)
        predicted, confidences = top.indices, top.values
        estimated = float(profile.calibrated(probs).max(1).values.double().mean())
        live = torch.bincount(predicted, minlength=len(profile.labels)).double()
        report["label_distribution"] = {
            "reference": dict(zip(profile.labels, profile.label_distribution.tolist(), strict=True)),
            "live": dict(zip(profile.labels, (live / live.sum()).tolist(), strict=True)),
        }
        labelled = [i for i, g in enumerate(seen.gold) if g is not None]
        if labelled:
            gold = torch.tensor([seen.gold[i] for i in labelled])
            report["accuracy"] = float((predicted[labelled] == gold).double().mean())
            report["labelled_rows"] = len(labelled)
    tests = drift_tests(
        profile,
        features=features,
        predicted=predicted,
        confidences=confidences,
        lengths=torch.tensor(seen.lengths, dtype=torch.float32),
        response_lengths=torch.tensor(seen.response_lengths, dtype=torch.float32)
        if seen.response_lengths
        else None,
        mean_logprobs=torch.tensor(seen.mean_logprobs, dtype=torch.float32) if seen.mean_logprobs else None,
        permutations=permutations,
        generator=generator,
    )
    p = family_p_value(tests)
    report["drift"] = {
        "alarm": p < alpha,
        "score": score_of(p),
        "p_value": p,
        "threshold": score_of(alpha),
        "window": len(examples),
        "tests": tests,
    }
    report["estimated_accuracy"] = estimated
    report["reference_accuracy"] = profile.accuracy
    report["length"] = {
        "reference_mean": float(profile.lengths.double().mean()) if profile.lengths.numel() else None,
        "live_mean": sum(seen.lengths) / len(seen.lengths),
    }
    report["unknown_rate"] = {
        "reference": float(profile.unknown_rates.double().mean()) if profile.unknown_rates.numel() else None,
        "live": sum(seen.unknown_rates) / len(seen.unknown_rates),
    }
    return report


def monitor_file(
    path: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    columns: Columns | None = None,
    model: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Compare ``data`` with the profile of every task under ``path``; write report.json and report.html to
    ``output`` (default: ``monitor-report`` beside the data file). Returns the report."""
    from multitune.serve.engine import find_adapters

    found = find_adapters(path)
    profiles = {name: load_profile(adapter) for name, adapter in found.items()}
    if not any(p is not None for p in profiles.values()):
        advice = "`; `".join(profile_command(found[n]) for n in list(found)[:3])
        what = f"{path} has no" if len(found) == 1 else f"none of the {len(found)} tasks under {path} has a"
        raise ConfigError(
            f"{what} drift profile (trained before profiles existed); build it with `{advice}`, FILE being "
            "the task's validation data"
        )
    inputs: dict[str, list[Example]] = {}
    problems: dict[str, MultituneError] = {}
    for name, adapter in found.items():
        if profiles[name] is None:
            continue
        kind = read_adapter_config(adapter)["task"]["kind"]
        try:
            inputs[name] = load_inputs(data, kind, columns or Columns())[1]
        except MultituneError as error:  # a bank's file may fit its classification tasks, not its generation
            problems[name] = error
    if not inputs:  # no task can read the file (missing columns, an empty file): the first reason is the fix
        raise next(iter(problems.values()))
    loaded = load_tasks(path, model, device)
    report: dict[str, Any] = {"data": str(data), "source": str(path), "alpha": alpha, "tasks": {}}
    for name in found:
        profile = profiles[name]
        if profile is None:
            report["tasks"][name] = {
                "monitored": False,
                "reason": f"no drift profile; run `{profile_command(found[name])}`",
            }
        elif name in problems:
            report["tasks"][name] = {"monitored": False, "reason": str(problems[name])}
        else:
            bank, _, max_length = loaded.tasks[name]
            report["tasks"][name] = task_report(
                profile, bank, name, inputs[name], max_length, batch_size, alpha
            )
    from multitune.health.report_html import render

    out = Path(output) if output is not None else Path(data).resolve().parent / "monitor-report"
    write_json_atomic(out / "report.json", report)
    write_bytes_atomic(out / "report.html", render(report).encode())
    report["output"] = str(out)
    return report


def summary_line(name: str, task: dict[str, Any]) -> str:
    """One line per task for the terminal: drift or not, the tests that moved, the accuracy estimate."""
    if not task.get("monitored"):
        return f"{name}: not monitored: {task.get('reason', '')}"
    drift = task["drift"]
    moved = sorted(drift["tests"].items(), key=lambda item: item[1]["p_value"])[:2]
    tests = ", ".join(f"{n} p {t['p_value']:.3g}" for n, t in moved)
    verdict = "DRIFT" if drift["alarm"] else "no drift"
    line = f"{name}: {verdict} (p {drift['p_value']:.3g}; {tests}) over {task['rows']} rows"
    if task.get("estimated_accuracy") is not None:
        reference = task.get("reference_accuracy")
        line += f"; estimated accuracy {task['estimated_accuracy']:.3f}"
        line += f" (reference {reference:.3f})" if reference is not None else ""
    if task.get("accuracy") is not None:
        line += f", accuracy on its labels {task['accuracy']:.3f}"
    return line
