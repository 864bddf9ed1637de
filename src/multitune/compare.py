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
3. **report**: ``OUTPUT/report.md``, ``report.html`` and ``plots/`` (:mod:`multitune.report`).

Resuming: a method's result is written to ``OUTPUT/results/METHOD.json`` when it is done; a rerun skips the
methods found there, and a method interrupted mid-search continues its study (its finished trials are kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitune.config import DataConfig, TrainConfig
from multitune.errors import ConfigError, MultituneError
from multitune.methods import METHODS, get_method
from multitune.storage import output_lock, write_json_atomic

DEFAULT_METHODS = ["full", "lora", "prefix", "adapter", "prompt", "ia3", "prompting"]
RESULTS = "results"
BANK = "bank"


@dataclass
class CompareConfig:
    model: str = "minilm"
    task: str = "task"
    kind: str = "classification"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    trials: int = 8
    max_epochs: int = 3
    output: str = "runs/compare"
    storage: str | None = None
    study_name: str | None = None
    search_only: bool = False
    isolate: bool = True
    latency_examples: int = 32
    bootstrap: int = 1000
    seed: int = 0
    progress: bool = True
    command: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_settings: dict[str, Any] = field(default_factory=dict)  # fixed (not searched) settings per method

    @property
    def out(self) -> Path:
        return Path(self.output)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def metric(self) -> str:
        return self.train.metric or ("accuracy" if self.kind == "classification" else "rouge_l")

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed compare must share with the first run (methods may be added)."""
        return {"model": self.model, "task": self.task, "kind": self.kind, "trials": self.trials,
                "max_epochs": self.max_epochs, "data": dataclasses.asdict(self.data),
                "train": {k: v for k, v in dataclasses.asdict(self.train).items()
                          if k not in ("device", "keep_checkpoint")}}


# ---- search spaces -------------------------------------------------------------------------------------
def _lr(trial: Any, method: str) -> float:
    default = get_method(method).default_learning_rate
    return trial.suggest_float("learning_rate", default / 5, default * 5, log=True)


SEARCH_SPACES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "lora": lambda t: {"lora.rank": t.suggest_categorical("lora.rank", [4, 8, 16])},
    "prefix": lambda t: {"prefix.num_virtual_tokens": t.suggest_categorical("prefix.num_virtual_tokens", [5, 10, 20])},
    "prompt": lambda t: {"prompt.num_virtual_tokens": t.suggest_categorical("prompt.num_virtual_tokens", [8, 20, 40])},
    "adapter": lambda t: {"adapter.reduction_factor": t.suggest_categorical("adapter.reduction_factor", [8, 16, 32])},
}


def suggest(trial: Any, method: str, max_epochs: int) -> dict[str, Any]:
    """The trial's settings: ``learning_rate``, ``epochs`` and ``METHOD.field`` keys."""
    if get_method(method).fit is not None:  # nothing trained: the shots are the settings
        shots = trial.suggest_categorical("prompting.shots", [0, 2, 4, 8])
        params: dict[str, Any] = {"prompting.shots": shots}
        if shots:
            params["prompting.selection"] = trial.suggest_categorical("prompting.selection", ["random", "similar"])
        return params
    params = {"learning_rate": _lr(trial, method), "epochs": trial.suggest_int("epochs", 1, max_epochs)}
    params.update(SEARCH_SPACES.get(method, lambda t: {})(trial))
    return params


def default_params(method: str, max_epochs: int) -> dict[str, Any]:
    """The method's defaults as trial settings: the first trial of every study."""
    if get_method(method).fit is not None:
        return {"prompting.shots": 0}
    config = METHODS[method].config_class()
    params: dict[str, Any] = {"learning_rate": get_method(method).default_learning_rate, "epochs": max_epochs}
    probe = _Recorder()
    SEARCH_SPACES.get(method, lambda t: {})(probe)
    for key in probe.names:
        params[key] = getattr(config, key.split(".", 1)[1])
    return params


class _Recorder:
    """A stand-in trial that records which settings a search space asks for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.names.append(name)
        return choices[0]


def settings_for(config: CompareConfig, method: str, params: dict[str, Any]) -> tuple[Any, TrainConfig]:
    """(method config, train config) of one set of trial settings over the user's fixed settings."""
    method_config = config.method_settings.get(method) or METHODS[method].config_class()
    overrides = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{method}.")}
    if method == "lora" and "rank" in overrides:
        overrides["alpha"] = 2.0 * overrides["rank"]  # alpha/r stays 2, the common choice
    method_config = dataclasses.replace(method_config, **overrides)
    problems = method_config.validate()
    if problems:
        raise ConfigError(f"{method}: " + "; ".join(problems))
    train = dataclasses.replace(config.train, metric=config.metric())
    if "learning_rate" in params:
        train.learning_rate = float(params["learning_rate"])
    if "epochs" in params:
        train.epochs = int(params["epochs"])
    return method_config, train


def describe(params: dict[str, Any]) -> str:
    parts = []
    for key, value in params.items():
        name = key.split(".", 1)[-1].replace("num_virtual_tokens", "tokens").replace("reduction_factor", "factor")
        parts.append(f"{'lr' if name == 'learning_rate' else name} {value:.2g}" if isinstance(value, float)
                     else f"{name} {value}")
    return ", ".join(parts)


# ---- one method, one set of settings --------------------------------------------------------------------
def _bank_with_task(config: CompareConfig, method: str, params: dict[str, Any], labels: list[str] | None,
                    task: str) -> tuple[Any, TrainConfig]:
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base

    method_config, train = settings_for(config, method, params)
    device = None if train.device == "auto" else train.device
    bank = MultiTaskModel(load_base(config.model, device=device))
    torch.manual_seed(train.seed)
    bank.add_task(task, config.kind, method, method_config, labels)  # type: ignore[arg-type]
    return bank, train


def fit_and_score(config: CompareConfig, method: str, params: dict[str, Any], splits: Any,
                  on_eval: Callable[[dict[str, Any]], None] | None = None, desc: str | None = None) -> Any:
    """Train one configuration on the train split; returns (bank, task, TrainResult, trainable parameters).

    The trainable count is taken before training: methods that fold at the end (prefix tuning's MLP) store
    fewer parameters than they train.
    """
    from multitune.train import train

    task = f"{config.task}-{method}"
    bank, train_config = _bank_with_task(config, method, params, splits.labels, task)
    trainable = sum(p.numel() for p in bank.task_parameters(task).values() if p.requires_grad)
    result = train(bank, task, splits.train, splits.validation, train_config, progress=config.progress,
                   on_eval=on_eval, desc=desc)
    return bank, task, result, trainable


# ---- the search -------------------------------------------------------------------------------------------
def _storage(url: str, shared: bool) -> Any:
    import optuna

    if not shared:
        return optuna.storages.RDBStorage(url)
    # A shared study (any --storage, SQLite too): a worker that dies stops beating and its trial is failed
    # after the grace period; no worker may fail another's running trial by itself.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=40,
                                          engine_kwargs={"pool_pre_ping": True})


def open_storage(config: CompareConfig) -> Any:
    """The study database; a bad URL, a missing driver or an unreachable server is one clear error."""
    url = config.storage_url()
    if url.startswith("sqlite"):
        config.out.mkdir(parents=True, exist_ok=True)
    try:
        return _storage(url, shared=config.storage is not None)
    except ImportError as error:
        missing = getattr(error.__cause__, "name", None) or "its driver"
        raise ConfigError(f"the storage {url.split(':')[0]} needs a database driver ({missing}); "
                          "install it: pip install 'multitune[postgres]'") from error
    except Exception as error:  # noqa: BLE001  (SQLAlchemy raises many kinds: all mean 'cannot open')
        raise ConfigError(f"cannot open the study storage {url}: {' '.join(str(error).split())[:200]}") from error


def open_study(config: CompareConfig, method: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(config)
    direction = "minimize" if config.metric() in ("loss", "perplexity") else "maximize"
    # One seed for a local study (reproducible); independent samplers for workers sharing a study.
    seed = config.seed if config.storage is None else None
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, config.trials // 3))
    name = f"{config.study_name or config.task}-{method}"
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2), load_if_exists=True)
    if config.storage is None:  # the folder's own study, under its lock: a trial still 'running' is from a killed run
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(default_params(method, config.max_epochs), skip_if_exists=True)
    return study


def _counted(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def search(config: CompareConfig, method: str, splits: Any, log: Callable[[str], None]) -> Any:
    """Run trials until the study holds ``config.trials``; wait for other workers' trials; return the study."""
    import optuna

    study = open_study(config, method)
    worker = f"{platform.node()}:{os.getpid()}"
    metric = config.metric()
    running: list[int] = []  # the number of the trial this worker runs now

    def objective(trial: Any) -> float:
        running[:] = [trial.number]
        trial.set_user_attr("worker", worker)
        params = suggest(trial, method, config.max_epochs)
        number = trial.number + 1

        def report(record: dict[str, Any]) -> None:
            trial.report(float(record[metric]), step=int(record["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {record[metric]:.4f} after epoch {record['epoch']}")

        start = time.perf_counter()
        try:
            _, _, result, _ = fit_and_score(config, method, params, splits, on_eval=report,
                                         desc=f"{method} trial {number}/{config.trials}")
        except optuna.TrialPruned as pruned:
            log(f"{method} trial {number}/{config.trials}: {describe(params)} -> pruned ({pruned})")
            raise
        value = result.best_metric
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{method}: the validation split gave no {metric}; give a validation split with examples")
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        best = value if not _finished(study) else (max if study.direction.name == "MAXIMIZE" else min)(
            value, study.best_value)
        log(f"{method} trial {number}/{config.trials}: {describe(params)} -> {metric} {value:.4f} (best {best:.4f})")
        return float(value)

    while True:
        _fail_stale(study)
        if _counted(study) >= config.trials:
            break
        try:
            study.optimize(objective, n_trials=1, catch=())
        except ValueError:
            # Optuna cannot record a result for a trial that someone else already ended (a worker that
            # took ours for a dead one): say so and go on, the trial is not counted.
            ended = [t for t in study.get_trials(deepcopy=False) if running and t.number == running[0]]
            if not ended or ended[0].state != optuna.trial.TrialState.FAIL:
                raise
            log(f"{method} trial {running[0] + 1}/{config.trials}: marked failed by another process while it ran "
                "(a worker sharing the study took it for a dead one); its result is dropped and another trial runs")
        running.clear()
    waited = 0.0
    while study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        if waited == 0:
            log(f"{method}: waiting for the trials other workers are running")
        time.sleep(2)
        waited += 2
        _fail_stale(study)
    if not _finished(study):
        raise ConfigError(f"{method}: no trial finished (all pruned or failed); try more --trials")
    return study


def _fail_stale(study: Any) -> None:
    """Mark the trials of workers that stopped beating as failed (the heartbeat API is 'experimental')."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _finished(study: Any) -> bool:
    import optuna

    return bool(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))


# ---- the final run ----------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory while in the block (sampled every 10 ms), or the CUDA allocator's peak."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:  # no /proc: the process's lifetime peak (kB on Linux, bytes on macOS)
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _latency_ms(bank: Any, task: str, examples: list[Any], config: CompareConfig) -> float | None:
    """Median milliseconds to answer one example alone (batch 1)."""
    from multitune.evaluate import generate_texts, predict_proba

    sample = examples[: config.latency_examples if config.kind == "classification" else 8]
    if not sample:
        return None
    times = []
    for ex in sample:
        start = time.perf_counter()
        if config.kind == "classification":
            predict_proba(bank, task, [ex], config.train.max_length, 1)
        else:
            generate_texts(bank, task, [ex], config.train.max_length, config.train.max_new_tokens, 1)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def score_test(bank: Any, task: str, examples: list[Any], config: CompareConfig) -> tuple[dict[str, float],
                                                                                         dict[str, list[float]], float]:
    """(test metrics, bootstrap 95% intervals, examples per second batched)."""
    import numpy as np

    from multitune.evaluate import generate_texts, lm_nll, predict_proba, scores_of_probabilities
    from multitune.metrics import (
        _rouge_l_sentence,
        bootstrap_interval,
        generation_metrics,
    )

    spec = bank.tasks[task]
    t = config.train
    start = time.perf_counter()
    if config.kind == "classification":
        probs = predict_proba(bank, task, examples, t.max_length, t.eval_batch_size)
        seconds = time.perf_counter() - start
        metrics, predictions = scores_of_probabilities(probs, examples, spec.labels)
        references = [ex.label or "" for ex in examples]
        correct = [float(p == r) for p, r in zip(predictions, references, strict=True)]
        intervals = {"accuracy": list(bootstrap_interval(correct, config.bootstrap, seed=config.seed))}
        if config.metric() == "macro_f1":
            from multitune.metrics import macro_f1

            rng = np.random.default_rng(config.seed)
            n = len(examples)
            draws = [macro_f1([predictions[i] for i in idx], [references[i] for i in idx], spec.labels)
                     for idx in rng.integers(0, n, size=(config.bootstrap, n))]
            intervals["macro_f1"] = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
    else:
        texts = generate_texts(bank, task, examples, t.max_length, t.max_new_tokens, max(1, t.eval_batch_size // 4))
        seconds = time.perf_counter() - start
        references = [ex.response or "" for ex in examples]
        metrics = generation_metrics(texts, references)
        total, count = lm_nll(bank, task, examples, t.max_length, max(1, t.eval_batch_size // 4))
        metrics["loss"] = total / max(count, 1)
        per_example = [_rouge_l_sentence(p, r) for p, r in zip(texts, references, strict=True)]
        intervals = {"rouge_l": list(bootstrap_interval(per_example, config.bootstrap, seed=config.seed))}
    return metrics, intervals, len(examples) / max(seconds, 1e-9)


def final_run(config: CompareConfig, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Retrain the best settings, measure everything, save the adapter; returns the method's result."""
    from multitune.catalog import base_parameters
    from multitune.storage import save_adapter

    splits = config.data.splits(config.kind)
    with PeakMemory() as memory:
        bank, task, result, trainable = fit_and_score(config, method, params, splits, desc=f"{method} final")
    metrics, intervals, throughput = score_test(bank, task, splits.test, config)
    latency = _latency_ms(bank, task, splits.test, config)
    folder = config.out / BANK / task
    save_adapter(bank, task, folder, extra={"metrics": {"test": metrics}, "compare": {"params": params}})
    stored = _folder_bytes(folder)
    base_bytes = sum(p.numel() * p.element_size() for p in bank.base.model.parameters())
    if get_method(method).changes_base:
        base_bytes = 0  # every task is a whole model: nothing is shared
    metric = config.metric()
    return {
        "method": method, "task": task, "kind": config.kind, "metric": metric,
        "higher_is_better": metric not in ("loss", "perplexity"),
        "best_params": params,
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / base_parameters(bank.base), 4),
        "stored_bytes": stored, "base_bytes": base_bytes, "storage_100_tasks_bytes": base_bytes + 100 * stored,
        "peak_memory_bytes": memory.peak, "memory_kind": "cuda" if memory.cuda else "rss",
        "train_seconds": round(result.seconds, 2), "steps": result.steps, "stopped_early": result.stopped_early,
        "latency_ms": latency, "throughput_per_s": round(throughput, 2),
        "validation": {metric: result.best_metric},
        "test": metrics, "test_ci": intervals, "test_examples": len(splits.test),
        "adapter": str(Path(BANK) / task),
    }


def _to_json(config: CompareConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["method_settings"] = {n: dataclasses.asdict(c) for n, c in config.method_settings.items()}
    return data


def _from_json(data: dict[str, Any]) -> CompareConfig:
    data = dict(data)
    data["data"] = DataConfig(**data["data"])
    data["train"] = TrainConfig(**data["train"])
    data["method_settings"] = {n: METHODS[n].config_class(**v) for n, v in data["method_settings"].items()}
    return CompareConfig(**data)


def child_main(payload_file: str) -> None:
    """The final run's own process (``python -m multitune.compare PAYLOAD``): its result or error goes to a file."""
    payload = json.loads(Path(payload_file).read_text())
    target = Path(payload["target"])
    try:
        result = final_run(_from_json(payload["config"]), payload["method"], payload["params"])
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


def final_isolated(config: CompareConfig, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The final run in a fresh Python process, so that its peak memory is this method's alone."""
    if not config.isolate:
        return final_run(config, method, params)
    folder = config.out / RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    target, payload = folder / f".{method}.child.json", folder / f".{method}.payload.json"
    target.unlink(missing_ok=True)
    write_json_atomic(payload, {"config": _to_json(config), "method": method, "params": params,
                                "target": str(target)})
    process = subprocess.run([sys.executable, "-m", "multitune.compare", str(payload)], check=False,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    payload.unlink(missing_ok=True)
    if not target.exists():
        raise RuntimeError(f"the final run of {method} died (exit code {process.returncode}) before writing a result")
    answer = json.loads(target.read_text())
    target.unlink()
    if "error" in answer:
        raise ConfigError(answer["error"])
    if "crash" in answer:
        raise RuntimeError(f"the final run of {method} failed:\n{answer['crash']}")
    return answer["result"]


# ---- the whole job ----------------------------------------------------------------------------------------
def _check_output(config: CompareConfig) -> None:
    state = config.out / "compare.json"
    if state.exists():
        previous = json.loads(state.read_text())["settings"]
        now = json.loads(json.dumps(config.fingerprint()))
        changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"{config.out} holds a comparison made with other settings ({', '.join(changed)}); "
                              "rerun with the same settings to resume it, or choose another --output")
    elif config.out.exists() and any(p.name != "study.db" for p in config.out.iterdir()):
        from multitune.storage import describe_folder

        raise ConfigError(f"{config.out} exists and is not a comparison folder: it is {describe_folder(config.out)}; "
                          "choose another --output")
    config.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state, {"settings": config.fingerprint()})


def validate(config: CompareConfig) -> None:
    problems = []
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        problems.append(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(sorted(METHODS))}")
    if not config.methods:
        problems.append("no methods given; pass --methods lora,prompt,...")
    if len(set(config.methods)) != len(config.methods):
        problems.append("a method is named twice in --methods")
    if config.trials < 1:
        problems.append(f"--trials must be >= 1 (got {config.trials})")
    if config.max_epochs < 1:
        problems.append(f"--max-epochs must be >= 1 (got {config.max_epochs})")
    if config.kind not in ("classification", "generation"):
        problems.append(f"--kind must be classification or generation (got '{config.kind}')")
    if problems:
        raise ConfigError("; ".join(problems))


def compare(config: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method of ``config``: search, final run, result file; then the report. Returns the summary.

    The output folder is locked for the whole run: a second compare into it (a worker too) is refused
    before it touches the folder or the study.
    """
    validate(config)
    with output_lock(config.out, "multitune compare" + (" --search-only" if config.search_only else "")):
        return _compare(config, log)


def _compare(config: CompareConfig, log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    _check_output(config)
    open_storage(config)
    splits = config.data.splits(config.kind)
    if not splits.validation:
        raise ConfigError("compare needs a validation split to search on; give --validation-data or a --split with "
                          "a validation share")
    log(f"compare {', '.join(config.methods)} on {config.model}: {len(splits.train)} train, "
        f"{len(splits.validation)} validation, {len(splits.test)} test examples; {config.trials} trials each; "
        f"study {config.storage_url().split('?')[0]}")
    results: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for method in config.methods:
        done = config.out / RESULTS / f"{method}.json"
        if done.exists():
            results.append(json.loads(done.read_text()))
            log(f"{method}: done in an earlier run ({done}); kept")
            continue
        try:
            method_start = time.perf_counter()
            study = search(config, method, splits, log)
            if config.search_only:
                log(f"{method}: best {config.metric()} {study.best_value:.4f} with {describe(study.best_params)}")
                continue
            search_seconds = time.perf_counter() - method_start
            params = study.best_params
            log(f"{method}: final run with {describe(params)}")
            result = final_isolated(config, method, params)
        except MultituneError as error:
            failures[method] = str(error)
            log(f"error: {method}: {' '.join(str(error).split())}")
            continue
        import optuna

        states = [t.state for t in study.get_trials(deepcopy=False)]
        result["trials"] = {"complete": states.count(optuna.trial.TrialState.COMPLETE),
                            "pruned": states.count(optuna.trial.TrialState.PRUNED),
                            "failed": states.count(optuna.trial.TrialState.FAIL)}
        result["search_seconds"] = round(search_seconds, 2)
        write_json_atomic(done, result)
        results.append(result)
        test = result["test"].get(result["metric"])
        ci = result["test_ci"].get(result["metric"])
        log(f"{method}: test {result['metric']} {test:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
            + f", {result['trainable_parameters']:,} trainable, {result['train_seconds']:.1f} s")
    summary: dict[str, Any] = {"results": results, "failures": failures, "wall_seconds": time.perf_counter() - start}
    if config.search_only or not results:
        return summary
    meta = {"model": config.model, "data": config.data.data, "task": config.task, "kind": config.kind,
            "examples": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
            "trials": config.trials, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "command": config.command, "wall_seconds": round(summary["wall_seconds"], 1), "metric": config.metric(),
            "higher_is_better": config.metric() not in ("loss", "perplexity"),
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - summary["wall_seconds"]))}
    from multitune.report import write_report

    summary["report"] = {k: str(v) for k, v in write_report(config.out, results, meta).items()}
    return summary


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the CLI does: the parent's trial lines are the progress shown
    child_main(sys.argv[1])
