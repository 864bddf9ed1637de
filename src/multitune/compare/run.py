"""``multitune compare``: search, train, evaluate and compare adaptation methods on the user's data.

For each method, in plain view:

1. **search**: an Optuna study over the method's key settings (learning rate, epochs, LoRA rank, prompt or
   prefix length, adapter reduction factor; shots for prompting), each trial trained on the train split and
   scored on the validation split; poor trials are pruned after an epoch (median rule). The first trial is
   the method's defaults. The study lives in a database: ``OUTPUT/study.db`` (SQLite) by default, or any
   ``--storage`` URL (``postgresql://...``) that several workers on different machines share: each worker
   runs trials until the study holds ``--trials`` of them.
2. **final run**: the best settings retrained with early stopping, in a process of its own so that its peak
   memory is the method's alone; the test split scored with a bootstrap 95% interval; training time,
   latency per example, parameters and bytes stored measured; the adapter saved to ``OUTPUT/bank/TASK``.
   A generation task's general-text perplexity is measured too (:mod:`multitune.health.general`: how much of
   the base's general language ability the method kept), and the bare base's once, for the report.
   The best settings are the best trial's among those that learned (:func:`~multitune.compare.search.
   chosen_trial`). A run that did not learn (``TrainResult.problem``: it predicts one label, or its loss stays
   at the chance level) is not the method's quality: compare spends one more run on it at a quarter of the
   learning rate, or four times it when its loss was still falling (:func:`final_or_rescued`); if that learns it is the method's result, else the method is
   reported as "did not learn", with the reason, and never ranked.
3. **seeds** (``--seeds N``): the chosen settings retrained with seeds seed+1 .. seed+N-1 beside the final
   run's seed, each scored on the test split: the mean and spread of the test metric (:func:`seed_runs`).
4. **report**: ``OUTPUT/report.md``, ``report.html`` and ``plots/`` (:mod:`multitune.compare.report`).

Resuming: a method's result (rescue and seed runs included) is written to ``OUTPUT/results/METHOD.json`` when
it is done; a rerun skips the methods found there, and a method interrupted mid-search continues its study (its
finished trials are kept).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from multitune.compare.audit import audit_key, audit_problems, audit_saved, audit_task
from multitune.compare.measure import PeakMemory, folder_bytes, latency_ms, score_test
from multitune.compare.search import (
    chosen_trial,
    describe,
    fit_and_score,
    open_storage,
    rescue_params,
    search,
)
from multitune.compare.settings import BANK, RESULTS, CompareConfig, from_json, to_json
from multitune.compare.table import get_field, problem_reason, rescue_scale
from multitune.config import plural
from multitune.errors import ConfigError, MultituneError
from multitune.methods import METHODS, get_method
from multitune.risks import privacy
from multitune.storage import output_lock, write_json_atomic
from multitune.trackers import Trackers, check_installed, nested_run, open_trackers, parse_report_to

GENERAL_MAX_LENGTH = 128  # tokens per general text (the built-in paragraphs fit): a few forwards per method


def final_run(
    config: CompareConfig, method: str, params: dict[str, Any], run: str = "final"
) -> dict[str, Any]:
    """Retrain the best settings, measure everything, save the adapter; returns the method's result.

    ``run`` names it (final, rescue) in the trackers: with ``--report-to`` it is a run nested in the
    comparison's, with the loop's losses and its measurements."""
    settings = {"method": method, "run": run, **params}
    with nested_run(config.train.report_to, config.out, f"{method} {run}", settings) as trackers:
        result = _final_run(config, method, params, trackers)
        if trackers is not None:
            trackers.log(result["test"], result["steps"], "test/")
            trackers.log(_measured(result), result["steps"], "run/")
        return result


def _measured(result: dict[str, Any]) -> dict[str, Any]:
    """A result's measurements, as the trackers take them (numbers)."""
    keys = ("stored_bytes", "peak_memory_bytes", "train_seconds", "latency_ms", "throughput_per_s") + (
        "trainable_parameters",
        "trainable_percent",
        "general_perplexity",
    )
    return {k: result[k] for k in keys if isinstance(result.get(k), int | float)}


def _final_run(config: CompareConfig, method: str, params: dict[str, Any], trackers: Any) -> dict[str, Any]:
    from multitune.compare.catalog import base_parameters
    from multitune.health.profile import save_task_profile
    from multitune.storage import save_adapter

    splits = config.data.splits(config.kind)
    with PeakMemory() as memory:
        bank, task, result, trainable = fit_and_score(
            config, method, params, splits, desc=f"{method} final", trackers=trackers
        )
    metrics, intervals, throughput = score_test(bank, task, splits.test, config)
    latency = latency_ms(bank, task, splits.test, config)
    folder = config.out / BANK / task
    save_adapter(bank, task, folder, extra={"metrics": {"test": metrics}, "compare": {"params": params}})
    stored = folder_bytes(folder)  # the task's weights: measured before the drift profile joins them
    save_task_profile(
        bank,
        task,
        folder,
        splits.validation,
        splits.train,
        config.train.max_length,
        config.train.eval_batch_size,
    )
    base_bytes = sum(p.numel() * p.element_size() for p in bank.base.model.parameters())
    if get_method(method).changes_base:
        base_bytes = 0  # every task is a whole model: nothing is shared
    metric = config.metric()
    general = general_perplexity_of(config, bank, task) if config.kind == "generation" else None
    audited = audit_task(bank, task, splits.test, config) if config.audit else None
    return {
        "method": method,
        "task": task,
        "kind": config.kind,
        "metric": metric,
        "higher_is_better": metric not in ("loss", "perplexity"),
        "best_params": params,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / base_parameters(bank.base), 4),
        "stored_bytes": stored,
        "base_bytes": base_bytes,
        "storage_100_tasks_bytes": base_bytes + 100 * stored,
        "peak_memory_bytes": memory.peak,
        "memory_kind": "cuda" if memory.cuda else "rss",
        "train_seconds": round(result.seconds, 2),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "latency_ms": latency,
        "throughput_per_s": round(throughput, 2),
        "validation": {metric: result.best_metric},
        "learned": result.problem is None,
        "problem": result.problem,  # why it did not learn, the likely cause and train's fix (None: it learned)
        "cause": result.cause,  # overshoot or slow (multitune.training.learned.cause_of), with problem
        "test": metrics,
        "test_ci": intervals,
        "test_examples": len(splits.test),
        "adapter": str(Path(BANK) / task),
        **({"general_perplexity": general} if general is not None else {}),
        **({"dp": result.privacy} if result.privacy is not None else {}),  # --dp-epsilon: what this run spent
        **(
            {"audit": audited} if audited is not None else {}
        ),  # --audit: counterfactual flips on the test split
    }


def general_perplexity_of(config: CompareConfig, bank: Any, task: str | None) -> float:
    """The general-text perplexity of ``task`` (None: the bare base) on ``--general-data`` or the built-in
    sample, each text cut to ``min(GENERAL_MAX_LENGTH, --max-length)`` tokens."""
    from multitune.health.general import general_perplexity, read_general

    length = min(GENERAL_MAX_LENGTH, config.train.max_length)
    return general_perplexity(bank, task, read_general(config.general_data), max_length=length)


def base_general_perplexity(config: CompareConfig) -> float:
    """The bare base's general-text perplexity: what every method's is read against (one more model load)."""
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base

    device = None if config.train.device == "auto" else config.train.device
    base = load_base(config.model, device=device, quantize=config.train.quantize)
    return general_perplexity_of(config, MultiTaskModel(base), None)


def child_main(payload_file: str) -> None:
    """The final run's own process (``python -m multitune.compare.run PAYLOAD``): its result or error goes to a file."""
    payload = json.loads(Path(payload_file).read_text())
    target = Path(payload["target"])
    try:
        config = from_json(payload["config"])
        result = final_run(config, payload["method"], payload["params"], payload.get("run", "final"))
        write_json_atomic(target, {"result": result})
    except MultituneError as error:
        write_json_atomic(target, {"error": str(error)})
    except BaseException:  # noqa: BLE001  (anything else: the parent shows the child's traceback)
        write_json_atomic(target, {"crash": traceback.format_exc()})


def _die_with_parent() -> None:
    """Linux: the final run ends when compare is killed (nothing keeps training for a dead parent)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def final_isolated(
    config: CompareConfig, method: str, params: dict[str, Any], run: str = "final"
) -> dict[str, Any]:
    """The final run in a fresh Python process, so that its peak memory is this method's alone."""
    if not config.isolate:
        return final_run(config, method, params, run)
    folder = config.out / RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    target, payload = folder / f".{method}.child.json", folder / f".{method}.payload.json"
    target.unlink(missing_ok=True)
    write_json_atomic(
        payload,
        {"config": to_json(config), "method": method, "params": params, "run": run, "target": str(target)},
    )
    process = subprocess.run(
        [sys.executable, "-m", "multitune.compare.run", str(payload)],
        check=False,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    payload.unlink(missing_ok=True)
    if not target.exists():
        raise RuntimeError(
            f"the final run of {method} died (exit code {process.returncode}) before writing a result"
        )
    answer = json.loads(target.read_text())
    target.unlink()
    if "error" in answer:
        raise ConfigError(answer["error"])
    if "crash" in answer:
        raise RuntimeError(f"the final run of {method} failed:\n{answer['crash']}")
    return answer["result"]


# ---- a run that did not learn, and the spread over seeds ---------------------------------------------------
def final_or_rescued(
    config: CompareConfig, method: str, trial: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """The final run of ``trial``'s settings; when it did not learn, one more at a quarter of the learning rate
    (four times it when the loss was still falling: ``cause`` slow).

    When the chosen trial itself did not learn (then no trial did), its final run would only repeat it (the same
    settings and seed), so the rescue is the final run. A rescue that learns is the method's result, its settings
    recorded; one that does not is still the result, marked ``learned: false`` for the report. ``rescue`` records
    what was rescued: the settings before, why they did not learn, the settings tried, and whether they learned.
    A method with nothing to train (prompting) has no learning rate to lower: its result is its final run's.
    """
    params = dict(trial.params)
    trains = get_method(method).fit is None
    if trial.user_attrs.get("problem") and trains:
        problem, cause, after = (
            str(trial.user_attrs["problem"]),
            trial.user_attrs.get("cause"),
            f"best trial (trial {trial.number + 1}; none learned)",
        )
    else:
        log(f"{method}: final run with {describe(params)}")
        result = final_isolated(config, method, params)
        if result["learned"] or not trains:
            if not result["learned"]:  # (the reason comes on the method's result line)
                log(f"{method}: its final run did not learn; it trains nothing, so there is no rescue")
            return result
        problem, cause, after = str(result["problem"]), result.get("cause"), "final run"
    lowered = rescue_params(method, params, cause or "overshoot")
    assert lowered is not None  # (trains)
    log(
        f"{method}: its {after} did not learn ({problem_reason(problem)}); rescue: one more run at "
        f"{rescue_scale(cause)} the learning rate, {describe(lowered)}"
    )
    result = final_isolated(config, method, lowered, "rescue")
    result["rescue"] = {
        "after": after,
        "from_params": params,
        "problem": problem,
        "cause": cause or "overshoot",
        "params": lowered,
        "learned": result["learned"],
    }
    if result["learned"]:
        log(f"rescued: {method} learned with {describe(lowered)}; this run is the method's result")
    else:
        log(f"{method}: the rescue did not learn either")
    return result


def seed_runs(
    config: CompareConfig, method: str, result: dict[str, Any], splits: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """The result's settings retrained with seeds seed+1 .. seed+N-1 (the final run was seed ``seed``), each
    scored on the test split; the summary of all N: mean, sample standard deviation, min, max, how many learned.

    A method with nothing to train (prompting) is not rerun: the training seed changes nothing of it, so its
    summary is its one final run (``trains: false``).
    """
    from multitune.compare.measure import score_test

    metric, first = config.metric(), config.train.seed
    runs = [_seed_record(first, result["test"].get(metric), result.get("problem"))]
    trains = get_method(method).fit is None
    for seed in range(first + 1, first + config.seeds) if trains else ():
        seeded = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
        desc = f"{method} seed {seed} ({seed - first + 1}/{config.seeds})"
        settings = {"method": method, "seed": seed, **result["best_params"]}
        with nested_run(config.train.report_to, config.out, f"{method} seed {seed}", settings) as trackers:
            bank, task, trained, _ = fit_and_score(
                seeded, method, result["best_params"], splits, desc=desc, trackers=trackers
            )
            metrics, _, _ = score_test(bank, task, splits.test, seeded)
            if trackers is not None:
                trackers.log(metrics, trained.steps, "test/")
        runs.append(_seed_record(seed, metrics.get(metric), trained.problem))
        value = runs[-1]["test"]
        log(
            f"{desc}: test {metric} "
            + (f"{value:.4f}" if value is not None else "n/a")
            + ("; did not learn" if trained.problem else "")
        )
    values = [r["test"] for r in runs if r["test"] is not None]
    return {
        "metric": metric,
        "trains": trains,
        "runs": runs,
        "n": len(runs),
        "learned": sum(bool(r["learned"]) for r in runs),
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,  # sample std (n - 1)
        "min": min(values, default=None),
        "max": max(values, default=None),
    }


def _seed_record(seed: int, value: Any, problem: str | None) -> dict[str, Any]:
    number = float(value) if isinstance(value, int | float) and value == value else None  # (NaN: none)
    return {"seed": seed, "test": number, "learned": problem is None, "problem": problem}


# ---- the whole job ----------------------------------------------------------------------------------------
def _check_output(config: CompareConfig) -> None:
    state = config.out / "compare.json"
    if state.exists():
        previous = json.loads(state.read_text())["settings"]
        previous.get("train", {}).pop("report_to", None)  # (folders made when it was part of the settings)
        now = json.loads(json.dumps(config.fingerprint()))
        changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                f"{config.out} holds a comparison made with other settings ({', '.join(changed)}); "
                "rerun with the same settings to resume it, or choose another --output"
            )
    elif config.out.exists() and any(p.name != "study.db" for p in config.out.iterdir()):
        from multitune.storage import describe_folder

        raise ConfigError(
            f"{config.out} exists and is not a comparison folder: it is {describe_folder(config.out)}; "
            "choose another --output"
        )
    config.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state, {"settings": config.fingerprint()})


def _method_problems(config: CompareConfig, merged: str) -> list[str]:
    """What is wrong with --methods itself: unknown names, none, one named twice."""
    problems = []
    unknown = [m for m in config.methods if m not in METHODS and m != merged]
    if unknown:
        problems.append(
            f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(sorted(METHODS))} (and merged)"
        )
    if not config.methods:
        problems.append("no methods given; pass --methods lora,prompt,...")
    if len(set(config.methods)) != len(config.methods):
        problems.append("a method is named twice in --methods")
    return problems


def validate(config: CompareConfig) -> None:
    from multitune.compare.merged import MERGED, merged_problems

    problems = merged_problems(config) + _method_problems(config, MERGED)
    try:  # --report-to: a name it does not know, or a tracker that is not installed, before any trial
        check_installed(parse_report_to(config.train.report_to))
    except ConfigError as error:
        problems.append(str(error))
    if config.search_dora and "lora" not in config.methods:
        problems.append("--search-dora searches LoRA's use_dora; add lora to --methods or drop it")
    fixed = config.method_settings.get("lora")
    if config.search_dora and fixed is not None and fixed.use_dora:
        problems.append(
            "--search-dora chooses use_dora itself, and --lora-use-dora fixes it; drop one of them"
        )
    if config.trials < 1:
        problems.append(f"--trials must be >= 1 (got {config.trials})")
    if config.max_epochs < 1:
        problems.append(f"--max-epochs must be >= 1 (got {config.max_epochs})")
    if config.seeds < 1:
        problems.append(
            f"--seeds must be >= 1 (got {config.seeds}): the number of seeds to retrain each method with"
        )
    if config.kind not in ("classification", "generation"):
        problems.append(f"--kind must be classification or generation (got '{config.kind}')")
    private = [m for m in config.methods if m in privacy.REFUSED]
    if config.train.dp_epsilon is not None and private:
        reasons = "; ".join(privacy.REFUSED[m].split("; use ")[0] for m in private)
        problems.append(
            f"--dp-epsilon compares methods under one privacy budget, which {', '.join(private)} cannot keep "
            f"({reasons}); drop them from --methods (see `multitune train --dp-epsilon`)"
        )
    problems += audit_problems(config)
    writes_base = [m for m in config.methods if m in METHODS and METHODS[m].changes_base]
    if config.train.quantize and writes_base:
        problems.append(
            f"--quantize keeps the base in 4 or 8 bits, which {', '.join(writes_base)} would train; drop "
            f"{', '.join(writes_base)} from --methods or drop --quantize"
        )
    if config.general_data is not None and config.kind != "generation":
        problems.append(
            "--general-data is the general-text sample of generation tasks; drop it or pass --kind generation"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    if config.kind == "generation":
        from multitune.health.general import read_general

        read_general(config.general_data)  # a bad file fails now, not after the first method's training


def compare(config: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method of ``config``: search, final run, result file; then the report. Returns the summary.

    The output folder is locked for the whole run: a second compare into it (a worker too) is refused
    before it touches the folder or the study.
    """
    validate(config)
    with output_lock(config.out, "multitune compare" + (" --search-only" if config.search_only else "")):
        _check_output(config)
        settings = {"methods": ",".join(config.methods), **config.fingerprint()}
        trackers = open_trackers(config.train.report_to, config.out, settings)  # the comparison's own run
        if trackers is None:
            return _compare(config, log)
        try:
            summary = _compare(config, log)
        except BaseException:
            trackers.close(failed=True)
            raise
        _report_to(trackers, config, summary)
        trackers.close()
        return summary


def _report_to(trackers: Trackers, config: CompareConfig, summary: dict[str, Any]) -> None:
    """The comparison's run: each method's test score, spread and measurements (``METHOD/...``), why a method
    failed or did not learn, and the report files."""
    metric = config.metric()
    for result in summary["results"]:
        method = result["method"]
        numbers = {f"test_{metric}": (result.get("test") or {}).get(metric), **_measured(result)}
        numbers["learned"] = int(bool(result.get("learned", True)))
        seeds = result.get("seeds") or {}
        numbers |= {f"seeds_{k}": seeds.get(k) for k in ("mean", "std", "min", "max") if seeds}
        trackers.log(numbers, 0, f"{method}/")
        if result.get("problem"):
            trackers.tag(f"{method}/problem", str(result["problem"]))
    for method, error in summary["failures"].items():
        trackers.tag(f"{method}/error", error)
    for path in (summary.get("report") or {}).values():
        if Path(path).is_file() and Path(path).suffix in (".md", ".html"):
            trackers.artifact(Path(path))


def run_method(
    config: CompareConfig, method: str, splits: Any, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """One method: its search, the final run (rescued if it did not learn), its seed runs; None when
    ``--search-only``."""
    import optuna

    method_start = time.perf_counter()
    study = search(config, method, splits, log)
    if config.search_only:
        log(f"{method}: best {config.metric()} {study.best_value:.4f} with {describe(study.best_params)}")
        return None
    search_seconds = time.perf_counter() - method_start
    result = final_or_rescued(config, method, chosen_trial(study), log)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    result["trials"] = {
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "failed": states.count(optuna.trial.TrialState.FAIL),
    }
    result["search_seconds"] = round(search_seconds, 2)
    if config.seeds > 1:
        result["seeds"] = seed_runs(config, method, result, splits, log)
    return result


def _result_line(result: dict[str, Any]) -> str:
    """The log's line of a finished method: its test score (or that it did not learn), spread, size, time."""
    method, metric = result["method"], result["metric"]
    test, ci = result["test"].get(metric), result["test_ci"].get(metric)
    score = "n/a" if test is None else f"{test:.4f}"
    line = f"{method}: test {metric} {score}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    if result.get("learned") is False:
        line = (
            f"{method}: did not learn ({problem_reason(result.get('problem'))}); its test {metric} {score} is "
            "not its quality on this task"
        )
    seeds = result.get("seeds") or {}
    if seeds.get("n", 1) > 1 and seeds.get("mean") is not None:
        spread = f" ± {seeds['std']:.4f}" if seeds.get("std") is not None else ""
        line += (
            f"; over {seeds['n']} seeds {seeds['mean']:.4f}{spread} ({seeds['min']:.4f}-{seeds['max']:.4f}), "
            f"{seeds['learned']} of {seeds['n']} learned"
        )
    general = result.get("general_perplexity")
    line += f", general-text perplexity {general:.2f}" if isinstance(general, int | float) else ""
    return line + f", {result['trainable_parameters']:,} trainable, {result['train_seconds']:.1f} s"


def _audit_line(result: dict[str, Any]) -> str:
    """The log's line of a method's audit: per attribute, the flip rate (or log-probability change) or that no
    test row mentions it."""
    from multitune.risks.audit import summary_line

    attributes = get_field(result, "audit", "attributes") or {}
    parts = [
        summary_line(name, test) if test.get("tested") else f"no test rows mention {name}"
        for name, test in attributes.items()
    ]
    return f"{result['method']}: audit: " + "; ".join(parts)


def _compare(config: CompareConfig, log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    open_storage(config)
    splits = config.data.splits(config.kind)
    if not splits.validation:
        raise ConfigError(
            "compare needs a validation split to search on; give --validation-data or a --split with "
            "a validation share"
        )
    log(
        f"compare {', '.join(config.methods)} on {config.model}: {len(splits.train)} train, "
        f"{len(splits.validation)} validation, {len(splits.test)} test examples; {plural(config.trials, 'trial')} each; "
        f"study {config.storage_url().split('?')[0]}"
    )
    results: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for method in config.methods:
        done = config.out / RESULTS / f"{method}.json"
        if done.exists():
            kept = json.loads(done.read_text())
            log(f"{method}: done in an earlier run ({done}); kept")
            if config.audit and (kept.get("audit") or {}).get("settings") != audit_key(config):
                kept["audit"] = audit_saved(config, kept, splits.test)  # audited now, from its saved folder
                write_json_atomic(done, kept)
                log(_audit_line(kept))
            results.append(kept)
            continue
        result: dict[str, Any] | None
        try:
            if method == "merged":  # compare/merged.py: the LoRA row's task merged with --merge-with's
                from multitune.compare.merged import merged_result

                lora = next((r for r in results if r["method"] == "lora"), None)
                if lora is None:
                    raise ConfigError("merged merges the LoRA row's task, and lora did not finish")
                result = merged_result(config, lora, splits, log)
            else:
                result = run_method(config, method, splits, log)
        except MultituneError as error:
            failures[method] = str(error)
            log(f"error: {method}: {' '.join(str(error).split())}")
            continue
        if result is None:  # --search-only
            continue
        write_json_atomic(done, result)
        results.append(result)
        log(_result_line(result))
        if "audit" in result:
            log(_audit_line(result))
    summary: dict[str, Any] = {
        "results": results,
        "failures": failures,
        "wall_seconds": time.perf_counter() - start,
    }
    if config.search_only or not results:
        return summary
    meta = {
        "model": config.model,
        "data": config.data.data,
        "task": config.task,
        "kind": config.kind,
        "examples": {
            "train": len(splits.train),
            "validation": len(splits.validation),
            "test": len(splits.test),
        },
        "trials": config.trials,
        "seeds": config.seeds,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "command": config.command,
        "wall_seconds": round(summary["wall_seconds"], 1),
        "metric": config.metric(),
        "higher_is_better": config.metric() not in ("loss", "perplexity"),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - summary["wall_seconds"])),
    }
    if config.train.dp_epsilon is not None:  # the report names what --dp-epsilon leaves out, and why
        meta["dp_refused"] = dict(privacy.REFUSED)
    if config.audit:
        meta["audit_language"] = config.audit_language
    if config.kind == "generation":
        meta["general_data"] = config.general_data or "built-in sample"
        meta["general_perplexity_base"] = base_general_perplexity(config)
        log(f"base: general-text perplexity {meta['general_perplexity_base']:.2f}")
    from multitune.compare.report import write_report

    summary["report"] = {k: str(v) for k, v in write_report(config.out, results, meta).items()}
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the CLI does: the parent's trial lines are the progress shown
    child_main(sys.argv[1])
