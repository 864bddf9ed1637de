"""The training loop in plain view: setup -> epochs -> evaluate -> early stop -> save.

:func:`train` trains one task of a bank; :func:`run` is the whole job behind ``multitune train``: read
and split the data, load the base, add the task, train, score the test split, save the adapter.

Resuming: every ``checkpoint_every`` optimizer steps the loop writes ``RUN/checkpoint`` atomically
(the task's weights, AdamW state, scheduler, RNG states, position in the epoch, early-stopping state).
Data order is a pure function of (seed, epoch), so a resumed run replays exactly the batches, dropout
masks and updates of an uninterrupted one and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel
from multitune.config import RunConfig, TrainConfig, to_yaml
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.evaluate import evaluate
from multitune.methods import get_method
from multitune.metrics import is_better
from multitune.models import load_base
from multitune.storage import atomic_dir, output_lock, save_adapter, write_json_atomic

CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    steps: int
    best_step: int | None
    best_metric: float | None
    metric: str
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def default_metric(kind: str) -> str:
    return "accuracy" if kind == "classification" else "loss"


def _accelerator(device: str) -> Any:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")


def epoch_steps(config: TrainConfig, examples: int) -> int:
    """Optimizer steps in one pass over ``examples`` (batches, then gradient accumulation)."""
    return math.ceil(math.ceil(examples / config.batch_size) / config.grad_accum)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, examples: int) -> tuple[Any, int]:
    """The warmup + decay schedule of ``config`` over ``examples`` training examples, and its total steps."""
    from transformers import get_scheduler

    total_steps = config.epochs * epoch_steps(config, examples)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_scheduler("constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
                              optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return scheduler, total_steps


def _batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


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
) -> TrainResult:
    """Train ``task`` of ``bank`` on ``train_examples``; early-stop on ``validation_examples``.

    On return the task holds the weights of its best evaluation (or the last step if none was run).
    ``on_step(step)`` is called after each optimizer step (a test uses it to interrupt a run);
    ``on_eval(record)`` after each validation (a hyperparameter search prunes poor trials from it).
    """
    # ---- setup -------------------------------------------------------------------------------------
    spec = bank.tasks[task]
    run_dir = Path(run_dir) if run_dir is not None else None
    metric = config.metric or default_metric(spec.kind)
    fit = get_method(spec.method).fit
    if fit is not None:  # nothing to optimise (prompting): fit, then score the validation split once
        return _fit_only(bank, task, fit, train_examples, validation_examples, config, run_dir, metric)
    accelerator = _accelerator(config.device)
    model = accelerator.prepare_model(bank)
    slot = bank.slots.index(task)
    pad_id = bank.base.tokenizer.pad_token_id
    features = encode_task(bank, task, train_examples, config.max_length)
    if spec.kind == "classification" and any("class_label" not in f for f in features):
        raise ConfigError(f"some training labels of task '{task}' are not in its label set {spec.labels}")
    keys = sorted(bank.task_parameters(task))
    params = [bank.task_parameters(task)[k] for k in keys]
    lr = config.learning_rate or get_method(spec.method).default_learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    scheduler, total_steps = lr_schedule(optimizer, config, len(features))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best_metric": None, "best_step": None,
                             "bad_evals": 0, "history": [], "stopped_early": False}
    best: dict[str, torch.Tensor] | None = None
    ckpt = run_dir / CHECKPOINT if run_dir else None
    if resume and ckpt is not None and (ckpt / "state.json").exists():
        state, best = _load_checkpoint(ckpt, bank, task, keys, optimizer, scheduler, config)
    if run_dir is not None:
        _rewrite_metrics(run_dir, state["history"])

    def evaluate_now() -> bool:
        """Score the validation split, keep the best weights; True when patience has run out.

        Once per step: the end of a run may coincide with an ``eval_every`` step or an epoch's end.
        """
        nonlocal best
        if not validation_examples:
            return False
        if state["history"] and state["history"][-1]["step"] == state["step"]:
            return state["bad_evals"] >= config.patience
        scores = evaluate(bank, task, validation_examples, config.max_length, config.eval_batch_size,
                          config.max_new_tokens, generate=metric not in ("loss", "perplexity"))
        if metric not in scores:
            raise ConfigError(f"metric '{metric}' is not computed for {spec.kind}; choose one of: {', '.join(scores)}")
        record = {"step": state["step"], "epoch": state["epoch"], "split": "validation", **scores,
                  "lr": scheduler.get_last_lr()[0], "elapsed": round(time.perf_counter() - start, 2)}
        state["history"].append(record)
        if run_dir is not None:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if is_better(metric, scores[metric], state["best_metric"]):
            state.update(best_metric=scores[metric], best_step=state["step"], bad_evals=0)
            best = bank.task_state_dict(task)
        else:
            state["bad_evals"] += 1
        bar.set_postfix_str(f"{_epoch_text(state, config.epochs)} loss {running:.4f} {metric} {scores[metric]:.4f}",
                            refresh=False)
        if on_eval is not None:
            on_eval(record)
        return state["bad_evals"] >= config.patience

    # ---- epochs ------------------------------------------------------------------------------------
    start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state["step"], desc=desc or f"train {task}", disable=not progress,
               dynamic_ncols=True)
    running = float("nan")
    model.train()
    stop = state["stopped_early"] or state["step"] >= total_steps
    try:
        while not stop and state["epoch"] < config.epochs:
            batches = _batch_order(len(features), config.batch_size, config.seed, state["epoch"])
            while state["batch"] < len(batches):
                index = state["batch"]
                batch = collate([features[i] for i in batches[index]], pad_id, slot)
                with accelerator.autocast():
                    loss = model(to_device(batch, accelerator.device)) / config.grad_accum
                accelerator.backward(loss)
                state["batch"] += 1
                if state["batch"] % config.grad_accum and state["batch"] < len(batches):
                    continue
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                running = loss.item() * config.grad_accum
                bar.update(1)
                bar.set_postfix_str(f"{_epoch_text(state, config.epochs)} loss {running:.4f}", refresh=False)
                if config.eval_every and state["step"] % config.eval_every == 0 and evaluate_now():
                    state["stopped_early"] = stop = True
                if state["step"] >= total_steps:
                    stop = True
                    # A run that ends mid-epoch (--max-steps) is scored at its last step; at an epoch's end
                    # the epoch's own evaluation below does it.
                    if state["batch"] < len(batches) and evaluate_now():
                        state["stopped_early"] = True
                if ckpt is not None and (state["step"] % config.checkpoint_every == 0 or stop):
                    _save_checkpoint(ckpt, bank, task, keys, optimizer, scheduler, state, best, config)
                if on_step is not None:
                    on_step(state["step"])
                if stop:
                    break
            if state["batch"] >= len(batches):  # a finished epoch; an early stop mid-epoch keeps its place
                state["epoch"] += 1
                state["batch"] = 0
                if (not config.eval_every or stop) and evaluate_now():  # each epoch, and the run's last step
                    state["stopped_early"] = stop = True
                if ckpt is not None:
                    _save_checkpoint(ckpt, bank, task, keys, optimizer, scheduler, state, best, config)
    finally:  # also when on_eval stops the run by raising (a pruned trial)
        bar.close()
        model.eval()

    # ---- restore the best ----------------------------------------------------------------------------
    if best is not None:
        bank.load_task_state_dict(task, best)
    fold = get_method(bank.tasks[task].method).fold
    if fold is not None:  # training-time parameters become what is saved and served
        fold(bank, task)
    return TrainResult(state["step"], state["best_step"], state["best_metric"], metric, state["stopped_early"],
                       time.perf_counter() - start, state["history"])


def _epoch_text(state: dict[str, Any], epochs: int) -> str:
    """The bar's epoch: an evaluation just after an epoch ended belongs to that epoch (never 'epoch 3/2')."""
    ended = state["batch"] == 0 and state["epoch"] > 0
    return f"epoch {state['epoch'] if ended else state['epoch'] + 1}/{epochs}"


def _fit_only(bank: MultiTaskModel, task: str, fit: Callable[..., None], train_examples: Sequence[Example],
              validation_examples: Sequence[Example], config: TrainConfig, run_dir: Path | None,
              metric: str) -> TrainResult:
    """A method without parameters: ``fit`` it, score the validation split once (step 0), as train() records it."""
    start = time.perf_counter()
    fit(bank, task, train_examples)
    history: list[dict[str, Any]] = []
    if validation_examples:
        scores = evaluate(bank, task, validation_examples, config.max_length, config.eval_batch_size,
                          config.max_new_tokens, generate=metric not in ("loss", "perplexity"))
        if metric not in scores:
            raise ConfigError(f"metric '{metric}' is not computed for {bank.tasks[task].kind}; choose one of: {', '.join(scores)}")
        history.append({"step": 0, "epoch": 0, "split": "validation", **scores, "lr": 0.0,
                        "elapsed": round(time.perf_counter() - start, 2)})
    if run_dir is not None:
        _rewrite_metrics(run_dir, history)
    best = history[-1][metric] if history else None
    return TrainResult(0, 0 if history else None, best, metric, False, time.perf_counter() - start, history)


def _fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (not max_steps: a run may be extended)."""
    return {k: v for k, v in asdict(config).items()
            if k not in ("max_steps", "device", "checkpoint_every", "keep_checkpoint")}


def _save_checkpoint(folder: Path, bank: MultiTaskModel, task: str, keys: list[str], optimizer: Any,
                     scheduler: Any, state: dict[str, Any], best: dict[str, torch.Tensor] | None,
                     config: TrainConfig) -> None:
    tensors = {f"param.{k}": v for k, v in bank.task_state_dict(task).items()}
    tensors.update({f"best.{k}": v for k, v in (best or {}).items()})
    opt = optimizer.state_dict()
    for index, slot_state in opt["state"].items():
        for name, value in slot_state.items():
            tensors[f"opt.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"state": state, "keys": keys, "param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict(), "config": _fingerprint(config)}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))


def _load_checkpoint(folder: Path, bank: MultiTaskModel, task: str, keys: list[str], optimizer: Any,
                     scheduler: Any, config: TrainConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    meta = json.loads((folder / "state.json").read_text())
    if meta["keys"] != keys or meta["config"] != _fingerprint(config):
        changed = sorted(k for k in meta["config"] if meta["config"][k] != _fingerprint(config).get(k))
        raise ConfigError(f"the checkpoint in {folder} was written with other settings ({', '.join(changed) or 'weights'}); "
                          "resume with the same settings, or start a new run without --resume")
    tensors = load_file(str(folder / "state.safetensors"))
    bank.load_task_state_dict(task, {k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["state"], best


def _rewrite_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl holds exactly the evaluations of the state we continue from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


# ---- the whole job ----------------------------------------------------------------------------------
def run(config: RunConfig, resume: bool = False, progress: bool = True,
        on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
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
    return isinstance(meta, dict) and {"state", "keys", "config"} <= set(meta)


def _run(config: RunConfig, out: Path, resume: bool, progress: bool,
         on_step: Callable[[int], None] | None) -> dict[str, Any]:
    used = out.is_dir() and any(out.iterdir())
    if used and not is_run_folder(out):  # never write a run into a comparison, a bank or someone's files
        from multitune.storage import describe_folder

        what = f"--resume continues a run of 'multitune train', but {out}" if resume else f"{out} already exists and"
        raise ConfigError(f"{what} is {describe_folder(out)}; choose another --output")
    if used and not resume:
        raise ConfigError(f"run folder {out} already exists; pass --resume to continue it, or choose another --output")
    if resume and (out / "result.json").exists():  # finished: its result, and no checkpoint left behind
        if not config.train.keep_checkpoint:
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        return json.loads((out / "result.json").read_text())
    splits = config.data.splits(config.kind)
    device = None if config.train.device == "auto" else config.train.device
    base = load_base(config.model, device=device)
    torch.manual_seed(config.train.seed)
    bank = MultiTaskModel(base)
    bank.add_task(config.task, config.kind, config.method, config.method_config(), splits.labels)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(RUN_MARK + to_yaml(config))
    trainable = sum(p.numel() for p in bank.task_parameters(config.task).values())
    result = train(bank, config.task, splits.train, splits.validation, config.train, out, resume, progress, on_step)
    test = evaluate(bank, config.task, splits.test, config.train.max_length, config.train.eval_batch_size,
                    config.train.max_new_tokens)
    stored = sum(p.numel() for p in bank.task_parameters(config.task).values())  # after folding
    summary = {
        "command": "train", "task": config.task, "method": config.method, "model": config.model,
        "examples": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "trainable_parameters": trainable, "stored_parameters": stored, "steps": result.steps, "best_step": result.best_step,
        "stopped_early": result.stopped_early, "train_seconds": round(result.seconds, 2),
        "validation": {result.metric: result.best_metric}, "test": test,
    }
    save_adapter(bank, config.task, out / "adapter", extra={"metrics": {"test": test}})
    write_json_atomic(out / "result.json", summary)
    if not config.train.keep_checkpoint:  # the run is done: the adapter is what is kept (--keep-checkpoint)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    return summary
