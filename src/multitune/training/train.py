"""Single-task training: :func:`train` one task of a bank; :func:`run`, the whole ``multitune train`` job.

:func:`train` gives the one training loop (:mod:`multitune.training.loop`: steps, evaluation, early stopping,
best weights, checkpoints and resume) what a single task needs: epochs over its encoded examples in seeded
order, the bank's loss of a batch, the task's validation metrics. :func:`run` reads and splits the data, loads
the base, adds the task, trains, scores the test split and saves the adapter, holding the run folder's lock.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from multitune import domain
from multitune.bank import MultiTaskModel
from multitune.config import RunConfig, TrainConfig, to_yaml
from multitune.data import Example, task_kind
from multitune.encode import collate, encode_task, pack, to_device
from multitune.errors import ConfigError
from multitune.health import kept
from multitune.health.profile import save_task_profile
from multitune.health.versions import DATA
from multitune.methods import get_method
from multitune.models import load_base
from multitune.risks import privacy
from multitune.storage import output_lock, save_adapter, write_json_atomic
from multitune.trackers import Trackers
from multitune.training.evaluate import evaluate
from multitune.training.learned import advice, cause_of, not_learned
from multitune.training.loop import CHECKPOINT, Objective, Shuffled, TrainResult, fit


def default_metric(kind: str) -> str:
    return "accuracy" if kind == "classification" else "loss"


def train(
    bank: MultiTaskModel,
    task: str,
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    config: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    desc: str | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    trackers: Trackers | None = None,
) -> TrainResult:
    """Train ``task`` of ``bank`` on ``train_examples``; early-stop on ``validation_examples``.

    On return the task holds the weights of its best evaluation (or the last step if none was run).
    ``on_step(step)`` is called after each optimizer step (a test uses it to interrupt a run);
    ``on_eval(record)`` after each validation (a hyperparameter search prunes poor trials from it).
    ``penalty()``, when given, is added to each micro-batch's loss (an update's EWC term,
    :func:`multitune.training.ewc.ewc_penalty`) and logged as "penalty"; "loss" stays the task's own loss,
    which is what :mod:`multitune.training.learned` judges. A method with nothing to optimise ignores it.
    ``trackers``: the tracker run (compare's nested trial run) the loop logs to; the caller closes it.
    """
    spec = bank.tasks[task]
    metric = config.metric or default_metric(spec.kind)
    privacy.check(config, len(train_examples), spec.method)
    fit_method = get_method(spec.method).fit
    if fit_method is not None:  # nothing to optimise (prompting): fit, then score the validation split once
        result = fit_only(
            bank,
            task,
            fit_method,
            train_examples,
            validation_examples,
            config,
            Path(run_dir) if run_dir is not None else None,
            metric,
        )
        return judged(bank, task, result, train_examples, validation_examples, None)
    slot = bank.slots.index(task)
    pad_id = bank.base.tokenizer.pad_token_id
    features = encode_task(bank, task, train_examples, config.max_length)
    if (
        spec.kind == "domain"
        and spec.objective != "clm"
        and (config.packing or config.dp_epsilon is not None)
    ):
        raise ConfigError(
            f"--packing and --dp-epsilon take a decoder's next-token batches; a {spec.objective} domain task masks "
            "or doubles its rows per batch: drop them"
        )
    if spec.objective == "simcse" and config.batch_size < 2:
        raise ConfigError("SimCSE contrasts each row with the batch's others; use --batch-size 2 or more")
    if spec.kind == "classification" and any("class_label" not in f for f in features):
        raise ConfigError(f"some training labels of task '{task}' are not in its label set {spec.labels}")
    if not features:
        raise ConfigError(f"task '{task}' has no training examples; give it some data")

    def batch_of(rows: list[int]) -> dict[str, torch.Tensor]:
        chosen = [features[i] for i in rows]
        if spec.objective == "mlm":  # fresh masks each batch, from the loop's RNG (resumable): domain.masked
            chosen = [domain.masked(f, bank.base.tokenizer) for f in chosen]
        return pack(chosen, slot) if config.packing else collate(chosen, pad_id, slot)  # encode.pack

    def loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = to_device(batch_of(rows), bank.base.device)
        value = domain.simcse_loss(bank, batch) if spec.objective == "simcse" else bank(batch)
        stats = {"loss": float(value.detach())}
        if penalty is not None:
            extra = penalty()
            stats["penalty"] = float(extra.detach())
            value = value + extra
        return value, stats

    def scores(_: str) -> dict[str, float] | None:
        if not validation_examples:
            return None
        return evaluate(
            bank,
            task,
            validation_examples,
            config.max_length,
            config.eval_batch_size,
            config.max_new_tokens,
            generate=metric not in ("loss", "perplexity"),
            spread=True,
        )

    lr = config.learning_rate or get_method(spec.method).default_learning_rate
    objective = Objective(
        [task], [lr], Shuffled(len(features), config.batch_size, config.seed), loss, scores, {task: metric}
    )
    plan = None
    if config.dp_epsilon is not None:  # DP-SGD: Poisson batches, clipped and noised per-sample gradients
        plan, objective.batches, objective.gradients = privacy.dp_sgd(
            bank,
            task,
            len(features),
            config,
            lambda rows: to_device(collate([features[i] for i in rows], pad_id, slot), bank.base.device),
        )
    result = fit(
        bank,
        objective,
        config,
        run_dir,
        resume,
        progress,
        desc or f"train {task}",
        on_step=on_step,
        on_eval=on_eval,
        trackers=trackers,
    )[task]
    if plan is not None:
        result.privacy = plan.record(result.steps)
    return judged(bank, task, result, train_examples, validation_examples, lr, config.epochs)


def judged(
    bank: MultiTaskModel,
    task: str,
    result: TrainResult,
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    learning_rate: float | None,
    epochs: int | None = None,
) -> TrainResult:
    """``result`` with ``problem`` set when a classification task did not learn (the reason, the cause, the fix)."""
    spec = bank.tasks[task]
    if spec.kind != "classification":
        return result
    reason = not_learned(result.history, result.best_step, validation_examples, train_examples, result.log)
    if reason is not None:
        method = get_method(spec.method)
        trains = method.fit is None
        result.cause = cause_of(result.history, result.log) if trains else None
        fix = advice(
            spec.method, learning_rate, method.default_learning_rate, trains, result.cause or "", epochs
        )
        result.problem = f"task '{task}' did not learn: {reason}; {fix}"
    return result


def fit_only(
    bank: MultiTaskModel,
    task: str,
    fit: Callable[..., None],
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    config: TrainConfig,
    run_dir: Path | None,
    metric: str,
) -> TrainResult:
    """A method without parameters: ``fit`` it, score the validation split once (step 0), as train() records it."""
    start = time.perf_counter()
    fit(bank, task, train_examples)
    history: list[dict[str, Any]] = []
    if validation_examples:
        scores = evaluate(
            bank,
            task,
            validation_examples,
            config.max_length,
            config.eval_batch_size,
            config.max_new_tokens,
            generate=metric not in ("loss", "perplexity"),
            spread=True,
        )
        if metric not in scores:
            raise ConfigError(
                f"metric '{metric}' is not computed for {bank.tasks[task].kind}; choose one of: {', '.join(scores)}"
            )
        history.append(
            {
                "step": 0,
                "epoch": 0,
                "split": "validation",
                **scores,
                "lr": 0.0,
                "elapsed": round(time.perf_counter() - start, 2),
            }
        )
    if run_dir is not None:
        _rewrite_metrics(run_dir, history)
    best = history[-1][metric] if history else None
    return TrainResult(0, 0 if history else None, best, metric, False, time.perf_counter() - start, history)


def _rewrite_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl holds exactly the evaluations of the state we continue from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def bare_scores(
    bank: MultiTaskModel, task: str, test: Sequence[Example], config: TrainConfig
) -> dict[str, float] | None:
    """A domain task's held-out scores with every adapter off (the bare base; an mlm task's head as it starts),
    before training: what its adapted scores are compared with. None for the other kinds."""
    if bank.tasks[task].kind != "domain":
        return None
    with bank.disabled():
        return evaluate(bank, task, test, config.max_length, config.eval_batch_size)


# ---- the whole job ----------------------------------------------------------------------------------
def run(
    config: RunConfig,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Data -> base -> task -> train -> test -> adapter; returns the summary written to RUN/result.json.

    The run folder is locked for the whole job (:func:`multitune.storage.output_lock`): a second run into
    it is refused before it changes anything.
    """
    out = Path(config.output)
    with output_lock(out, "multitune train"):
        return _run(config, out, resume, progress, on_step)


RUN_MARK = "# multitune train run folder: the settings of this run (--config reads them back)\n"


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by ``multitune train`` (what --resume may continue).

    Marked by the first line of its config.yaml (from the start of the run) and result.json's
    ``command``; folders of older versions by their checkpoint or by result.json's train-only keys.
    """
    if (folder / "compare.json").exists() or (folder / "adapter.json").exists():
        return False
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        result = None
    if isinstance(result, dict):
        return result.get("command", "train") == "train" and "stored_parameters" in result
    try:
        if (folder / "config.yaml").read_text().startswith(RUN_MARK):
            return True
        meta = json.loads((folder / CHECKPOINT / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (
        {"state", "keys", "config"} <= set(meta) or {"loop", "keys", "config"} <= set(meta)
    )


def _run(
    config: RunConfig, out: Path, resume: bool, progress: bool, on_step: Callable[[int], None] | None
) -> dict[str, Any]:
    used = out.is_dir() and any(out.iterdir())
    if used and not is_run_folder(out):  # never write a run into a comparison, a bank or someone's files
        from multitune.storage import describe_folder

        what = (
            f"--resume continues a run of 'multitune train', but {out}"
            if resume
            else f"{out} already exists and"
        )
        raise ConfigError(f"{what} is {describe_folder(out)}; choose another --output")
    if used and not resume:
        raise ConfigError(
            f"run folder {out} already exists; pass --resume to continue it, or choose another --output"
        )
    if resume and (out / "result.json").exists():  # finished: its result, and no checkpoint left behind
        if not config.train.keep_checkpoint:
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        return json.loads((out / "result.json").read_text())
    task, kind = config.task_name, task_kind(config.kind)
    splits = config.data.splits(kind)
    canaries = None
    if config.data.canaries is not None:  # risks/canaries.py: secrets planted to measure memorisation
        from multitune.risks.canaries import plant

        splits, canaries = plant(
            splits, kind, config.data.canaries, config.data.canary_repeats, config.train.seed
        )
    golden = None
    if (
        config.data.golden is not None
    ):  # risks/golden.py: read before the base loads, so a bad file costs nothing
        from multitune.risks.golden import read_golden

        golden = read_golden(config.data.golden, kind, config.data.columns())
        unknown = (
            sorted({ex.label or "" for ex in golden} - set(splits.labels)) if kind == "classification" else []
        )
        if unknown:
            raise ConfigError(
                f"the golden set {config.data.golden} has label(s) {', '.join(unknown[:5])} that the training "
                f"data does not have ({', '.join(splits.labels[:10])}); fix its labels or drop those rows"
            )
    privacy.check(config.train, len(splits.train), config.method)  # before the base is loaded
    if config.data.counterfactual_augment and config.train.dp_epsilon is not None:
        raise ConfigError(
            "--counterfactual-augment with --dp-epsilon: a row and its counterfactuals are one person's data, "
            "while DP-SGD's guarantee counts each training row as a person of its own; drop one of the two"
        )
    if config.data.counterfactual_augment:  # risks/augment.py: each row's counterfactuals, with its label
        from multitune.risks.augment import augment_splits

        data = config.data
        splits = augment_splits(
            splits, data.counterfactual_attributes, data.counterfactual_lexicon, data.counterfactual_language
        )
    device = None if config.train.device == "auto" else config.train.device
    base = load_base(config.model, device=device, quantize=config.train.quantize)
    torch.manual_seed(config.train.seed)
    bank = MultiTaskModel(base)
    on = None
    if config.stack_on is not None:  # the frozen component it trains above (multitune.compose.stack)
        from multitune.compose.stack import stack_on_run

        on = stack_on_run(bank, config.stack_on, task)
    bank.add_task(
        task, kind, config.method, config.method_config(), splits.labels, None, config.domain_objective, on
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(RUN_MARK + to_yaml(config))
    trainable = sum(p.numel() for p in bank.task_parameters(task).values())
    before = bare_scores(bank, task, splits.test, config.train)
    result = train(bank, task, splits.train, splits.validation, config.train, out, resume, progress, on_step)
    test = evaluate(
        bank,
        task,
        splits.test,
        config.train.max_length,
        config.train.eval_batch_size,
        config.train.max_new_tokens,
    )
    stored = sum(p.numel() for p in bank.task_parameters(task).values())  # after folding
    golden_score = None
    if golden is not None:
        from multitune.risks.golden import score_golden

        golden_score = score_golden(bank, task, golden, config.train)
    summary = {
        "command": "train",
        "task": task,
        "method": config.method,
        "model": config.model,
        "quantize": config.train.quantize,
        "examples": {
            "train": len(splits.train),
            "validation": len(splits.validation),
            "test": len(splits.test),
        },
        "trainable_parameters": trainable,
        "stored_parameters": stored,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 2),
        "validation": {result.metric: result.best_metric},
        "test": test,
        **({"test_before": before, "objective": bank.tasks[task].objective} if before is not None else {}),
        "learned": result.problem is None,
        "problem": result.problem,
        "cause": result.cause,
        **({"dp": result.privacy} if result.privacy is not None else {}),
        **({"golden": golden_score} if golden_score is not None else {}),
    }
    save_adapter(bank, task, out / "adapter", extra={"metrics": {"test": test}})
    save_task_profile(  # the drift monitor's reference (multitune.health.profile); none for a domain task
        bank,
        task,
        out / "adapter",
        splits.validation,
        splits.train,
        config.train.max_length,
        config.train.eval_batch_size,
    )
    # what `multitune update` measures forgetting on and rehearses (multitune.health.kept)
    kept.keep(out / DATA, splits, asdict(config.data), config.train.seed, config.data.keep_replay)
    if canaries is not None:
        from multitune.risks.canaries import FILE as CANARIES

        write_json_atomic(out / CANARIES, canaries)
    if golden is not None:  # every later `multitune update` scores its versions on these rows
        from multitune.risks.golden import save_golden

        save_golden(out, golden)
    write_json_atomic(out / "result.json", summary)
    _report_final(config, out, summary, test)
    if not config.train.keep_checkpoint:  # the run is done: the adapter is what is kept (--keep-checkpoint)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    return summary


def _report_final(config: RunConfig, out: Path, summary: dict[str, Any], test: dict[str, Any]) -> None:
    """--report-to: the test scores join the tracker runs the loop wrote (rank 0 of a launch alone)."""
    from multitune.trackers import report_final
    from multitune.training.distributed import active

    if active()[0] == 0:
        extra = {k: summary.get(k) for k in ("train_seconds", "trainable_parameters")}
        report_final(config.train.report_to, out, {**test, **extra}, int(summary.get("steps") or 0))
