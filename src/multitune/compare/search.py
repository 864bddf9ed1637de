"""The search of ``multitune compare``: one Optuna study per method over its key settings.

Each trial is the same :func:`~multitune.training.train.train` as ``multitune train`` on the train split,
scored on the validation split; its ``on_eval`` hook reports each epoch's validation metric so that the median
pruner can stop a poor trial. The first trial is the method's defaults. Each trial records whether it learned
(its ``problem`` attribute, from :mod:`multitune.training.learned`): :func:`chosen_trial` retrains the best of
those that learned, and :func:`rescue_params` gives the one extra run a non-learner gets. What a method searches is its own
registered ``search`` (:class:`~multitune.methods.Method`), plus a learning rate within 5x of the method's
default and 1..``max_epochs`` epochs for methods that train. The study lives in ``OUTPUT/study.db`` (SQLite) or
a shared ``--storage`` (PostgreSQL): workers on several machines add trials until it holds ``trials``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from multitune.compare.settings import CompareConfig
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.trackers import nested_run
from multitune.training.loop import head_learning_rate

RESCUE_LEARNING_RATE_SCALE = 0.25  # a non-learner's rescue run: a quarter of its learning rate (overshoot)
RESCUE_SLOW_SCALE = 4.0  # or four times it, when its loss was still falling (learned.cause_of: slow)


def _lr(trial: Any, method: str) -> float:
    default = get_method(method).default_learning_rate
    return trial.suggest_float("learning_rate", default / 5, default * 5, log=True)


def _head_default(method: str) -> float:
    return head_learning_rate(TrainConfig(), get_method(method).default_learning_rate)


def suggest(
    trial: Any, method: str, max_epochs: int, head: bool = False, dora: bool = False
) -> dict[str, Any]:
    """The trial's settings: ``learning_rate`` and ``epochs`` (methods that train), ``head_learning_rate``
    (``head``: a classification task whose head rate the user did not fix; a quarter to four times its
    default), the method's own ``METHOD.field`` keys from its registered ``search``, and with ``dora`` (compare
    --search-dora) LoRA's choice between plain LoRA and DoRA."""
    record = get_method(method)
    params: dict[str, Any] = {}
    if record.fit is None:  # methods with nothing to train search only their own settings
        params = {"learning_rate": _lr(trial, method), "epochs": trial.suggest_int("epochs", 1, max_epochs)}
        if head and record.score is None:
            default = _head_default(method)
            params["head_learning_rate"] = trial.suggest_float(
                "head_learning_rate", default / 4, default * 4, log=True
            )
    if record.search is not None:
        params.update(record.search(trial))
    if dora and method == "lora":
        params["lora.use_dora"] = trial.suggest_categorical("lora.use_dora", [False, True])
    return params


def default_params(method: str, max_epochs: int, head: bool = False, dora: bool = False) -> dict[str, Any]:
    """The method's defaults as trial settings: the first trial of every study."""
    record = get_method(method)
    config = record.config_class()
    params: dict[str, Any] = {}
    if record.fit is None:
        params = {"learning_rate": record.default_learning_rate, "epochs": max_epochs}
        if head and record.score is None:
            params["head_learning_rate"] = _head_default(method)
    probe = _Recorder()
    if record.search is not None:
        record.search(probe)
    for key in probe.names:
        params[key] = getattr(config, key.split(".", 1)[1])
    if dora and method == "lora":  # the first trial is plain LoRA, as the method's defaults are
        params["lora.use_dora"] = False
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
    import optuna

    method_config = config.method_settings.get(method) or METHODS[method].config_class()
    search = get_method(method).search
    if (
        search is not None
    ):  # the settings a search derives from the suggested ones (LoRA's alpha from its rank)
        params = {**params, **search(optuna.trial.FixedTrial(params))}
    overrides = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{method}.")}
    method_config = dataclasses.replace(method_config, **overrides)
    problems = method_config.validate()
    if problems:
        raise ConfigError(f"{method}: " + "; ".join(problems))
    train = dataclasses.replace(config.train, metric=config.metric())
    if "learning_rate" in params:
        train.learning_rate = float(params["learning_rate"])
    if "head_learning_rate" in params:
        train.head_learning_rate = float(params["head_learning_rate"])
    if "epochs" in params:
        train.epochs = int(params["epochs"])
    return method_config, train


def searches_head(config: CompareConfig) -> bool:
    """Whether trials search the head's learning rate: classification, and not fixed by the user."""
    return config.kind == "classification" and config.train.head_learning_rate is None


def describe(params: dict[str, Any]) -> str:
    parts = []
    for key, value in params.items():
        name = (
            key.split(".", 1)[-1]
            .replace("num_virtual_tokens", "tokens")
            .replace("reduction_factor", "factor")
        )
        parts.append(
            f"{ {'learning_rate': 'lr', 'head_learning_rate': 'head lr'}.get(name, name) } {value:.2g}"
            if isinstance(value, float)
            else f"{name} {value}"
        )
    return ", ".join(parts)


# ---- one method, one set of settings --------------------------------------------------------------------
def _bank_with_task(
    config: CompareConfig, method: str, params: dict[str, Any], labels: list[str] | None, task: str
) -> tuple[Any, TrainConfig]:
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base

    method_config, train = settings_for(config, method, params)
    device = None if train.device == "auto" else train.device
    bank = MultiTaskModel(load_base(config.model, device=device, quantize=train.quantize))
    torch.manual_seed(train.seed)
    bank.add_task(task, config.kind, method, method_config, labels)
    return bank, train


def fit_and_score(
    config: CompareConfig,
    method: str,
    params: dict[str, Any],
    splits: Any,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    desc: str | None = None,
    trackers: Any = None,
) -> Any:
    """Train one configuration on the train split; returns (bank, task, TrainResult, trainable parameters).

    The trainable count is taken before training: methods that fold at the end (prefix tuning's MLP) store
    fewer parameters than they train. ``trackers``: the run's nested tracker run (``--report-to``), which the
    loop's steps and evaluations go to; it is logged with the run's trainable count here.
    """
    from multitune.training.train import train

    task = f"{config.task}-{method}"
    bank, train_config = _bank_with_task(config, method, params, splits.labels, task)
    trainable = sum(p.numel() for p in bank.task_parameters(task).values() if p.requires_grad)
    result = train(
        bank,
        task,
        splits.train,
        splits.validation,
        train_config,
        progress=config.progress,
        on_eval=on_eval,
        desc=desc,
        trackers=trackers,
    )
    if trackers is not None:
        trackers.log(
            {"trainable_parameters": trainable, f"best_{train_config.metric}": result.best_metric},
            result.steps,
            "run/",
        )
        trackers.tag("learned", "yes" if result.problem is None else f"no: {result.problem}")
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
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=10, grace_period=40, engine_kwargs={"pool_pre_ping": True}
        )


def open_storage(config: CompareConfig) -> Any:
    """The study database; a bad URL, a missing driver or an unreachable server is one clear error."""
    url = config.storage_url()
    if url.startswith("sqlite"):
        config.out.mkdir(parents=True, exist_ok=True)
    try:
        return _storage(url, shared=config.storage is not None)
    except ImportError as error:
        missing = getattr(error.__cause__, "name", None) or "its driver"
        raise ConfigError(
            f"the storage {url.split(':')[0]} needs a database driver ({missing}); "
            "install it: pip install 'multitune[postgres]'"
        ) from error
    except Exception as error:  # noqa: BLE001  (SQLAlchemy raises many kinds: all mean 'cannot open')
        raise ConfigError(
            f"cannot open the study storage {url}: {' '.join(str(error).split())[:200]}"
        ) from error


def open_study(config: CompareConfig, method: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(config)
    direction: Literal["minimize", "maximize"] = (
        "minimize" if config.metric() in ("loss", "perplexity") else "maximize"
    )
    # One seed for a local study (reproducible); independent samplers for workers sharing a study.
    seed = config.seed if config.storage is None else None
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, config.trials // 3))
    name = f"{config.study_name or config.task}-{method}"
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=direction,
        sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        load_if_exists=True,
    )
    if config.storage is None:  # the folder's own study, under its lock: a 'running' trial is a killed run's
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(
            default_params(method, config.max_epochs, searches_head(config), config.search_dora),
            skip_if_exists=True,
        )
    return study


def _counted(study: Any) -> int:
    import optuna

    states = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.RUNNING,
    )
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
        params = suggest(trial, method, config.max_epochs, searches_head(config), config.search_dora)
        number = trial.number + 1

        def report(record: dict[str, Any]) -> None:
            trial.report(float(record[metric]), step=int(record["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {record[metric]:.4f} after epoch {record['epoch']}")

        start = time.perf_counter()
        name = f"{method} trial {number}"
        settings = {"method": method, "trial": number, **params}
        with nested_run(config.train.report_to, config.out, name, settings, (optuna.TrialPruned,)) as runs:
            try:
                _, _, result, _ = fit_and_score(
                    config,
                    method,
                    params,
                    splits,
                    on_eval=report,
                    desc=f"{method} trial {number}/{config.trials}",
                    trackers=runs,
                )
            except optuna.TrialPruned as pruned:
                log(f"{method} trial {number}/{config.trials}: {describe(params)} -> pruned ({pruned})")
                if runs is not None:
                    runs.tag("state", f"pruned: {pruned}")
                raise
            if runs is not None:
                runs.tag("state", "complete")
        value = result.best_metric
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(
                f"{method}: the validation split gave no {metric}; give a validation split with examples"
            )
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        # why it did not learn (None: it learned); a non-learner is never the chosen trial when one learned
        trial.set_user_attr("problem", result.problem)
        trial.set_user_attr("cause", result.cause)  # which way a rescue moves the learning rate
        best = (
            value
            if not _finished(study)
            else (max if study.direction.name == "MAXIMIZE" else min)(value, study.best_value)
        )
        log(
            f"{method} trial {number}/{config.trials}: {describe(params)} -> {metric} {value:.4f} (best {best:.4f})"
            + ("; did not learn" if result.problem else "")
        )
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
            log(
                f"{method} trial {running[0] + 1}/{config.trials}: marked failed by another process while it ran "
                "(a worker sharing the study took it for a dead one); its result is dropped and another trial runs"
            )
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


def chosen_trial(study: Any) -> Any:
    """The trial whose settings compare retrains: the best of the complete trials that learned, else the best.

    A trial that did not learn (its ``problem`` attribute, from :mod:`multitune.training.learned`) scores the
    label prior, not the method: with unbalanced labels that can beat a trial that learned a little. Trials
    recorded before the attribute existed count as learned. Ties go to the earlier trial, as Optuna's own.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    learned = [t for t in complete if not t.user_attrs.get("problem")]
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(learned or complete, key=lambda t: t.value)


def rescue_params(method: str, params: dict[str, Any], cause: str = "overshoot") -> dict[str, Any] | None:
    """The settings of the one extra run that tries to rescue a non-learner: ``params`` at a quarter of their
    learning rate when its updates overshot until the model settled on one answer, at four times it when its
    loss was still falling (``cause``, from :func:`multitune.training.learned.cause_of`); None for a method
    with nothing to train (prompting: no learning rate to move)."""
    record = get_method(method)
    if record.fit is not None:
        return None
    rate = float(params.get("learning_rate") or record.default_learning_rate)
    scale = RESCUE_SLOW_SCALE if cause == "slow" else RESCUE_LEARNING_RATE_SCALE
    return {**params, "learning_rate": rate * scale}


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
