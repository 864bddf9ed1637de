"""The one training loop: setup -> steps -> evaluate -> early stop -> checkpoint, for every trainer.

Single-task training, multi-task training, the reward model and DPO differ only in what a batch is, what its
loss is and how a task is scored; they hand those to :func:`fit` as an :class:`Objective`, and the loop does
the rest once: AdamW with each trained task's parameters grouped by learning rate (its method's rate, the
method's per-parameter scales, the head's own rate: :func:`parameter_groups`), warmup and decay, gradient
accumulation,
clipping per task (one task's large gradient does not shrink another's step), evaluation every
``eval_every`` steps or at each epoch's end and always at the last step, early stopping per task (a task
whose score has not improved for ``patience`` evaluations is frozen: its learning rate becomes 0 and the
batches stop drawing its rows; the run ends when every task is frozen), each task's best weights restored
at the end, then its method's ``fold``.

Resuming: every ``checkpoint_every`` steps, at each epoch's end and when the run stops, ``RUN/checkpoint`` is
written atomically (the tasks' weights and best weights, AdamW's moments, the schedule, the RNG, the loop's
position and early-stopping state, the batch source's state). Batches are a pure function of the seed and
that state, and the RNG is the run's own (forked from the caller's and seeded), so a resumed run replays the
batches, dropout masks and updates of an uninterrupted one and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.storage import atomic_dir
from multitune.trackers import Trackers, open_trackers
from multitune.training import distributed
from multitune.training.checkpointing import checkpointed

CHECKPOINT = "checkpoint"
FORMAT = 3  # 3: AdamW groups by learning rate within a task (head, method scales); 2: one group per task;
# 1 (before the one loop): a single task without a task prefix
LOWER_IS_BETTER = ("loss", "perplexity")
HEAD_LEARNING_RATE = 1e-3  # the least a fresh classification head learns at (see head_learning_rate)
DROPOUT_SEED = 1_000_003  # the run's RNG starts at seed + this: a stream apart from the task's initialisation


@dataclass
class TrainResult:
    """One task's run: ``steps`` is the step it was frozen at (or the last), ``history`` its evaluations."""

    steps: int
    best_step: int | None
    best_metric: float | None
    metric: str
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(
        default_factory=list
    )  # each step's mean training statistics (the run's)
    problem: str | None = (
        None  # set when the run did not learn (multitune.training.learned): why, and the fix
    )
    cause: str | None = None  # with problem, for a trained method: "overshoot" or "slow" (learned.cause_of)
    privacy: dict[str, Any] | None = None  # a DP-SGD run's epsilon spent and settings (risks.privacy)


class Batches(Protocol):
    """The micro-batches of a run: ``count(epoch)`` of them in an epoch, the ``index``-th by ``get``.

    ``active`` tells which of the objective's tasks still train (a source may stop drawing the others).
    ``state_dict``/``load_state_dict`` carry whatever the source needs to continue after a resume.
    """

    def count(self, epoch: int) -> int: ...

    def get(self, epoch: int, index: int, active: Sequence[bool]) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class Shuffled:
    """Epochs over ``n`` items in batches of ``batch_size``: one permutation per (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch: tuple[int, list[list[int]]] | None = None

    def count(self, epoch: int) -> int:
        return math.ceil(self.n / self.batch_size)

    def get(self, epoch: int, index: int, active: Sequence[bool]) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, batch_order(self.n, self.batch_size, self.seed, epoch))
        return self._epoch[1][index]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@dataclass
class Objective:
    """The caller's part of a run.

    ``tasks`` are trained together (one parameter group each, at ``learning_rates``); ``loss(batch)`` gives a
    micro-batch's mean loss and statistics to log (floats); ``evaluate(task)`` the task's validation scores,
    or None when it has no validation data; ``metrics`` each task's early-stopping metric; ``key(task,
    scores)``, when given, orders evaluations (larger is better) instead of the metric alone.
    ``gradients(batch)``, when given, replaces the loop's backward of ``loss``: it sets the parameters'
    ``.grad`` itself and returns the statistics to log (DP-SGD's clipped, noised per-sample sum:
    :mod:`multitune.risks.privacy`); the loop then clips nothing.
    """

    tasks: list[str]
    learning_rates: list[float]
    batches: Batches
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[str], dict[str, float] | None]
    metrics: dict[str, str]
    key: Callable[[str, dict[str, float]], tuple[float, ...]] | None = None
    gradients: Callable[[Any], dict[str, float]] | None = None

    def score_key(self, task: str, scores: dict[str, float]) -> tuple[float, ...]:
        if self.key is not None:
            return self.key(task, scores)
        value = float(scores[self.metrics[task]])
        return (-value if self.metrics[task] in LOWER_IS_BETTER else value,)


def accelerator_for(device: str) -> Any:
    """accelerate's device placement, autocast (bf16 on GPUs that support it) and backward."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")


def epoch_steps(config: TrainConfig, examples: int) -> int:
    """Optimizer steps in one pass over ``examples`` (batches, then gradient accumulation)."""
    return math.ceil(math.ceil(examples / config.batch_size) / config.grad_accum)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """The warmup + decay schedule of ``config`` over ``total_steps``."""
    from transformers import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if config.scheduler == "constant" else config.scheduler,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    steps = config.epochs * steps_per_epoch
    return steps if config.max_steps is None else min(steps, config.max_steps)


def head_learning_rate(config: TrainConfig, learning_rate: float) -> float:
    """A classification head's learning rate: ``config.head_learning_rate``, else the larger of the method's
    rate and :data:`HEAD_LEARNING_RATE` (a fresh head, zero-mean and small, learns from scratch: at full
    fine-tuning's 3e-5 a 77-class head barely moves in a few epochs)."""
    if config.head_learning_rate is not None:
        return config.head_learning_rate
    return max(learning_rate, HEAD_LEARNING_RATE)


def parameter_groups(
    bank: MultiTaskModel, task: str, keys: Sequence[str], learning_rate: float, config: TrainConfig
) -> list[tuple[float, list[torch.nn.Parameter]]]:
    """The task's parameters (``keys``, in order) grouped by learning rate: its head at
    :func:`head_learning_rate`, the rest at ``learning_rate`` times its method's ``learning_rate_scale``."""
    params = bank.task_parameters(task)
    scale = get_method(bank.tasks[task].method).learning_rate_scale
    head = head_learning_rate(config, learning_rate)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for key in keys:
        rate = head if key.startswith("head.") else learning_rate * (scale(key) if scale else 1.0)
        groups.setdefault(rate, []).append(params[key])
    return list(groups.items())


@dataclass
class _Task:
    """The loop's state of one trained task (JSON in the checkpoint, with its best weights as tensors)."""

    best_key: list[float] | None = None
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    frozen: bool = False
    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class _Run:
    """One run of :func:`fit` apart from its loop: the optimizer and schedule, each task's early-stopping state
    and best weights, the loop's position, metrics.jsonl and the checkpoint."""

    def __init__(
        self,
        bank: MultiTaskModel,
        objective: Objective,
        config: TrainConfig,
        run_dir: Path | None,
        on_eval: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.bank, self.objective, self.config, self.run_dir, self.on_eval = (
            bank,
            objective,
            config,
            run_dir,
            on_eval,
        )
        self.tasks, self.multi = objective.tasks, len(objective.tasks) > 1
        self.keys = {t: sorted(bank.task_parameters(t)) for t in self.tasks}
        self.groups = [[bank.task_parameters(t)[k] for k in self.keys[t]] for t in self.tasks]  # clipped
        param_groups, self.group_task = [], []  # AdamW's groups: a task's parameters by learning rate
        for i, (task, lr) in enumerate(zip(self.tasks, objective.learning_rates, strict=True)):
            for rate, params in parameter_groups(bank, task, self.keys[task], lr, config):
                param_groups.append({"params": params, "lr": rate})
                self.group_task.append(i)
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
        self.per_epoch = math.ceil(objective.batches.count(0) / config.grad_accum)
        self.total = total_steps(config, self.per_epoch)
        self.scheduler = lr_schedule(self.optimizer, config, self.total)
        self.loop: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "stopped": False, "log": []}
        self.state = {t: _Task() for t in self.tasks}
        self.best: dict[str, dict[str, torch.Tensor] | None] = dict.fromkeys(self.tasks)
        self.checkpoint = run_dir / CHECKPOINT if run_dir is not None else None
        self.start = time.perf_counter()
        self.running = float("nan")  # the last step's mean loss, for the progress bar
        self.bar: Any = None
        self.trackers: Trackers | None = None  # --report-to (rank 0 only)

    def resume(self) -> None:
        """Continue from the checkpoint when there is one."""
        ckpt = self.checkpoint
        if ckpt is not None and (ckpt / "state.json").exists():
            self.loop = _load_checkpoint(ckpt, self)

    def open_metrics(self, preamble: Sequence[dict[str, Any]]) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lines = sorted(
            (self._logged(t, r) for t in self.tasks for r in self.state[t].history), key=lambda r: r["step"]
        )
        (self.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [*preamble, *lines])
        )

    @property
    def done(self) -> bool:
        """Every task frozen (patience ran out) or every step taken."""
        return (
            self.loop["stopped"]
            or self.loop["step"] >= self.total
            or all(s.frozen for s in self.state.values())
        )

    def stepped(self, sums: dict[str, float], micro: int, loss: torch.Tensor) -> None:
        """After an optimizer step: its mean statistics into the log and the bar."""
        self.loop["step"] += 1
        means = {name: value / micro for name, value in sums.items()}
        self.running = means.get("loss", float(loss.detach()))
        self.loop["log"].append(
            {
                "step": self.loop["step"],
                "epoch": self.loop["epoch"] + 1,
                **means,
                "lr": self.scheduler.get_last_lr()[0],
            }
        )
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"{_epoch_text(self.loop, self.config.epochs)} loss {self.running:.4f}", refresh=False
        )
        if self.trackers is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.trackers.log(
                {**self.loop["log"][-1], "steps_per_second": self.loop["step"] / elapsed},
                self.loop["step"],
                "train/",
            )

    def evaluate(self) -> None:
        """Score every task still training (once per step); keep the best weights; freeze the stale ones."""
        for i, task in enumerate(self.tasks):
            s = self.state[task]
            if s.frozen or (s.history and s.history[-1]["step"] == self.loop["step"]):
                continue
            with torch.no_grad():
                scores = self.objective.evaluate(task)
            if scores is not None:
                self._record(i, task, scores)
        if self.multi:
            self.bar.set_postfix_str(f"loss {self.running:.4f}", refresh=False)
        elif self.state[self.tasks[0]].history:
            last, metric = self.state[self.tasks[0]].history[-1], self.objective.metrics[self.tasks[0]]
            self.bar.set_postfix_str(
                f"{_epoch_text(self.loop, self.config.epochs)} loss {self.running:.4f} "
                f"{metric} {last[metric]:.4f}",
                refresh=False,
            )

    def _record(self, i: int, task: str, scores: dict[str, float]) -> None:
        s, step, metric = self.state[task], self.loop["step"], self.objective.metrics[task]
        if metric not in scores:
            raise ConfigError(
                f"metric '{metric}' is not computed for task '{task}'; choose one of: {', '.join(scores)}"
            )
        record = {
            "step": step,
            "epoch": step // max(self.per_epoch, 1),
            "split": "validation",
            **scores,
            "lr": self.optimizer.param_groups[self.group_task.index(i)]["lr"],
            "elapsed": round(time.perf_counter() - self.start, 2),
        }
        s.history.append(record)
        if self.trackers is not None:
            self.trackers.log(record, step, f"validation/{task}/" if self.multi else "validation/")
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(self._logged(task, record)) + "\n")
        key = list(self.objective.score_key(task, scores))
        if s.best_key is None or key > s.best_key:
            s.best_key, s.best_metric, s.best_step, s.bad_evals = key, float(scores[metric]), step, 0
            self.best[task] = self.bank.task_state_dict(task)
        else:
            s.bad_evals += 1
            if s.bad_evals >= self.config.patience:  # frozen: no more steps, no more rows
                for j in (j for j, owner in enumerate(self.group_task) if owner == i):
                    self.optimizer.param_groups[j]["lr"] = 0.0
                    self.scheduler.base_lrs[j] = 0.0  # the scheduler rescales base_lrs at every step
                s.frozen, s.steps, s.seconds = True, step, time.perf_counter() - self.start
        if self.on_eval is not None:
            self.on_eval(self._logged(task, record))

    def save(self) -> None:
        if self.checkpoint is not None:
            _save_checkpoint(self.checkpoint, self)

    def finish(self) -> dict[str, TrainResult]:
        """Each task's best weights, then its method's fold; the results."""
        results = {}
        for task in self.tasks:
            s = self.state[task]
            best = self.best[task]
            if best is not None:
                self.bank.load_task_state_dict(task, best)
            fold = get_method(self.bank.tasks[task].method).fold
            if fold is not None:  # training-time parameters become what is saved and served
                fold(self.bank, task)
            seconds = s.seconds if s.frozen else time.perf_counter() - self.start
            results[task] = TrainResult(
                s.steps if s.frozen else self.loop["step"],
                s.best_step,
                s.best_metric,
                self.objective.metrics[task],
                s.frozen,
                seconds,
                s.history,
                self.loop["log"],
            )
        return results

    def _logged(self, task: str, record: dict[str, Any]) -> dict[str, Any]:
        return {"task": task, **record} if self.multi else record


def fit(  # noqa: C901  (the training loop in plain view: ../shared/STYLE.md keeps it in one function)
    bank: MultiTaskModel,
    objective: Objective,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    score_start: bool = False,
    train_mode: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    preamble: Sequence[dict[str, Any]] = (),
    trackers: Trackers | None = None,
) -> dict[str, TrainResult]:
    """Train ``objective.tasks`` of ``bank``; each ends with its best weights (see the module docstring).

    ``score_start``: the weights before the first step are scored too, and kept if no step beats them.
    ``train_mode``: dropout on (False: the model stays in eval mode, as preference training wants).
    ``on_step(step)`` after each optimizer step; ``on_eval(record)`` after each validation (a search prunes
    trials from it by raising). ``run_dir``: metrics.jsonl and the checkpoint go there; ``resume``
    continues from its checkpoint. ``preamble``: metrics.jsonl lines written before the loop's own (the
    step-0 scores of tasks that had nothing to train). ``trackers``: the tracker run the steps and evaluations go
    to, owned (closed) by the caller (compare's trials); without it, ``--report-to`` opens the run folder's own.
    """
    run = _Run(bank, objective, config, Path(run_dir) if run_dir is not None else None, on_eval)
    accelerator = accelerator_for(
        config.device
    )  # device placement, autocast (bf16 where supported), backward
    model = accelerator.prepare_model(bank)
    batches, loop = objective.batches, run.loop
    rank, world = distributed.active()  # torchrun / accelerate launch: this process's share of each step
    reduced = [p for group in run.groups for p in group]
    loss = torch.tensor(float("nan"))
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    saver = checkpointed(bank, config.gradient_checkpointing)  # --gradient-checkpointing: blocks recomputed
    with (
        torch.random.fork_rng(devices=cuda),
        saver,
    ):  # the run's own RNG: dropout draws from the seed alone ...
        torch.manual_seed(config.seed + DROPOUT_SEED)  # ... not the numbers that initialised the task
        if resume:
            run.resume()
            loop = run.loop
        run.open_metrics(preamble)
        if rank == 0:
            run.trackers = trackers or open_trackers(config.report_to, run.run_dir, asdict(config))
        run.bar = tqdm(
            total=run.total, initial=loop["step"], desc=desc, disable=not progress, dynamic_ncols=True
        )
        model.train(train_mode)
        if score_start and loop["step"] == 0:
            run.evaluate()
        stop = run.done
        try:
            while not stop and loop["epoch"] < config.epochs:
                count = batches.count(loop["epoch"])
                sums: dict[str, float] = {}
                while loop["batch"] < count:
                    active = [not run.state[t].frozen for t in run.tasks]
                    batch = batches.get(loop["epoch"], loop["batch"], active)  # every process draws (a source
                    # may keep state): each computes only its own micro-batches (training/distributed.py)
                    if world > 1 and (loop["batch"] % config.grad_accum) % world != rank:
                        loop["batch"] += 1
                    elif objective.gradients is not None:  # the objective sets .grad (DP-SGD)
                        with accelerator.autocast():
                            stats = objective.gradients(batch)
                        loss = torch.tensor(stats.get("loss", float("nan")))
                        loop["batch"] += 1
                        for name, value in stats.items():
                            sums[name] = sums.get(name, 0.0) + value
                    else:
                        with accelerator.autocast():
                            loss, stats = objective.loss(batch)
                        accelerator.backward(loss / config.grad_accum)
                        loop["batch"] += 1
                        for name, value in stats.items():
                            sums[name] = sums.get(name, 0.0) + value
                    if loop["batch"] % config.grad_accum and loop["batch"] < count:
                        continue
                    if world > 1:  # every process's gradients and statistics summed: one update everywhere
                        sums = distributed.all_reduce_gradients(reduced, sums)
                        loss = torch.tensor(sums.get("loss", float("nan")))
                    if (
                        config.max_grad_norm > 0 and objective.gradients is None
                    ):  # per task: one task's large gradient does not shrink another's
                        for group in run.groups:
                            accelerator.clip_grad_norm_(group, config.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                    run.stepped(sums, (loop["batch"] - 1) % config.grad_accum + 1, loss)
                    sums = {}
                    if config.eval_every and loop["step"] % config.eval_every == 0:
                        run.evaluate()
                    if loop["step"] >= run.total:
                        stop = True
                        if loop["batch"] < count:  # ends mid-epoch (--max-steps): scored at its last step
                            run.evaluate()
                    if all(s.frozen for s in run.state.values()):
                        loop["stopped"] = stop = True
                    if loop["step"] % config.checkpoint_every == 0 or stop:
                        run.save()
                    if on_step is not None:
                        on_step(loop["step"])
                    if stop:
                        break
                if loop["batch"] >= count:  # a finished epoch; a stop mid-epoch keeps its place
                    loop["epoch"], loop["batch"] = loop["epoch"] + 1, 0
                    if not config.eval_every or stop or loop["epoch"] >= config.epochs:
                        run.evaluate()  # each epoch, and always the run's last step
                    if all(s.frozen for s in run.state.values()):
                        loop["stopped"] = stop = True
                    run.save()
            if not loop["stopped"]:
                run.evaluate()  # a run that ended between evaluations is scored at its last step
        finally:  # also when on_eval stops the run by raising (a pruned trial)
            run.bar.close()
            if run.trackers is not None and run.trackers is not trackers:
                run.trackers.close()
            model.eval()
    return run.finish()


def _epoch_text(loop: dict[str, Any], epochs: int) -> str:
    """The bar's epoch: an evaluation just after an epoch ended belongs to that epoch (never 'epoch 3/2')."""
    ended = loop["batch"] == 0 and loop["epoch"] > 0
    return f"epoch {loop['epoch'] if ended else loop['epoch'] + 1}/{epochs}"


# ---- checkpoints --------------------------------------------------------------------------------------
def fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (not max_steps: a run may be extended)."""
    return {
        k: v
        for k, v in asdict(config).items()
        if k not in ("max_steps", "device", "checkpoint_every", "keep_checkpoint")
    }


def _save_checkpoint(folder: Path, run: _Run) -> None:
    bank, objective, optimizer, scheduler = run.bank, run.objective, run.optimizer, run.scheduler
    best = run.best
    tensors: dict[str, torch.Tensor] = {}
    for task in objective.tasks:
        tensors.update({f"param/{task}/{k}": v for k, v in bank.task_state_dict(task).items()})
        tensors.update({f"best/{task}/{k}": v for k, v in (best[task] or {}).items()})
    opt = optimizer.state_dict()
    for index, slot_state in opt["state"].items():
        for name, value in slot_state.items():
            tensors[f"opt/{index}/{name}"] = value.detach().cpu().contiguous()
    tensors.update({f"batches/{k}": v for k, v in objective.batches.state_dict().items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {
        "format": FORMAT,
        "loop": run.loop,
        "tasks": {t: asdict(s) for t, s in run.state.items()},
        "keys": run.keys,
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "config": fingerprint(run.config),
    }
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))


def _load_checkpoint(folder: Path, run: _Run) -> dict[str, Any]:
    bank, objective, keys, config = run.bank, run.objective, run.keys, run.config
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"the checkpoint in {folder} was written by an older multitune; start a new run "
            "without --resume (or into another --output)"
        )
    if meta["keys"] != keys or meta["config"] != fingerprint(config):
        changed = sorted(k for k in meta["config"] if meta["config"][k] != fingerprint(config).get(k))
        raise ConfigError(
            f"the checkpoint in {folder} was written with other settings "
            f"({', '.join(changed) or 'tasks or weights'}); resume with the same settings, or start "
            "a new run without --resume"
        )
    tensors = load_file(str(folder / "state.safetensors"))
    for task in objective.tasks:
        bank.load_task_state_dict(task, _under(tensors, f"param/{task}/"))
        run.best[task] = _under(tensors, f"best/{task}/") or None
        run.state[task] = _Task(**meta["tasks"][task])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _under(tensors, "opt/").items():
        index, name = key.split("/", 1)
        opt_state.setdefault(int(index), {})[name] = value
    run.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    run.scheduler.load_state_dict(meta["scheduler"])
    objective.batches.load_state_dict(_under(tensors, "batches/"))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return meta["loop"]


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
