"""Multi-task training: every optimizer step draws one batch whose rows come from many tasks.

The tasks already live in one bank (any methods but ``full``, which owns the base). Each row of a batch
draws its task first and then the task's next example (T5, Raffel et al. 2020, section 3.5.2):

- ``proportional``: p_i = n_i / sum_j n_j (examples-proportional mixing, without T5's cap K);
- ``temperature``: p_i = n_i^(1/T) / sum_j n_j^(1/T) (temperature-scaled mixing, T5 and mT5 use T = 2..3;
  T = 1 is proportional, T -> inf uniform).

Within a task, examples come in epochs: one permutation per (seed, task, epoch), so a run is a pure
function of its seed. Classification rows go through :meth:`MultiTaskModel.classify` together (tasks
with fewer labels get -inf logits in the extra columns, which cross-entropy ignores), generation rows
through :meth:`MultiTaskModel.lm_loss`; a batch holding both kinds computes both in one step.

The loss of a batch of B rows (``reduction="mean"``, what training uses) is::

    L = ( sum_{classification rows r} CE_r  +  B_gen * NLL_gen / T_gen ) / B

with NLL_gen the summed token NLL of the B_gen generation rows and T_gen their target-token count (as
:func:`multitune.training.train.train` averages tokens). ``reduction="sum"`` gives the plain sum of row CEs and
token NLLs; every term depends only on its own row's task, so each task's parameters receive gradient
from its own rows alone (tests/test_multitask.py checks it for every method on three families).

One AdamW has one parameter group per task (the method's default learning rate unless given), with
warmup and decay as in train.py and gradient clipping per task (one task's large gradient does not
shrink another's step). Every ``eval_every`` steps (default: once per epoch of the mixture, sum n_i /
batch rows) each task still training is scored on its validation split; a task whose metric has not
improved for ``patience`` evaluations is frozen (its group's learning rate becomes 0 and its rows are
no longer drawn), and the run ends when every task is frozen or the steps run out. Each task ends
with its best weights, then its method's ``fold`` hook.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from multitune.bank import MultiTaskModel
from multitune.config import DataConfig, RunConfig, TrainConfig, settings_dict, validate
from multitune.data import Example, task_kind
from multitune.encode import collate, encode_task, pack, to_device
from multitune.errors import ConfigError
from multitune.flags import read_yaml_mapping, settings_from_mapping, settings_parser, split_settings
from multitune.health import kept
from multitune.health.profile import save_task_profile
from multitune.health.versions import DATA
from multitune.methods import METHODS, get_method
from multitune.storage import output_lock, save_adapter, write_json_atomic
from multitune.training.evaluate import evaluate
from multitune.training.loop import CHECKPOINT, Objective, TrainResult, epoch_steps, fit
from multitune.training.train import default_metric, fit_only, judged

SAMPLING = ("proportional", "temperature")


# ---- sampling ---------------------------------------------------------------------------------------
def task_probabilities(
    sizes: Sequence[int], sampling: str = "proportional", temperature: float = 2.0
) -> list[float]:
    """The probability of each task for one row: n_i / sum n, or n_i^(1/T) / sum n^(1/T)."""
    if sampling not in SAMPLING:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLING)} (got '{sampling}'); fix --sampling")
    if sampling == "temperature" and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}); try --temperature 2")
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    weights = [float(n) ** power for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class RowSampler:
    """A deterministic stream of rows (task index, example index).

    Each row's task is drawn from ``probabilities`` (renormalised over the tasks still active); each task
    then yields its examples in epochs, one permutation per (seed, task, epoch).
    """

    def __init__(self, sizes: Sequence[int], probabilities: Sequence[float], seed: int) -> None:
        self.sizes = list(sizes)
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = [0] * len(sizes)  # examples drawn so far, per task
        self._orders: dict[int, tuple[int, list[int]]] = {}  # task -> (epoch, its permutation)

    def draw(self, n: int, active: Sequence[bool] | None = None) -> list[tuple[int, int]]:
        p = self.probabilities.clone()
        if active is not None:
            p *= torch.tensor([float(a) for a in active], dtype=torch.float64)
        tasks = torch.multinomial(p / p.sum(), n, replacement=True, generator=self.generator).tolist()
        return [(t, self._next(t)) for t in tasks]

    def _next(self, task: int) -> int:
        epoch, position = divmod(self.drawn[task], self.sizes[task])
        self.drawn[task] += 1
        if self._orders.get(task, (None,))[0] != epoch:
            # task 0 sees the order train() uses for the same seed: one task here is train()'s run
            generator = torch.Generator().manual_seed((self.seed + 1_000 * task) * 100_003 + epoch)
            self._orders[task] = (epoch, torch.randperm(self.sizes[task], generator=generator).tolist())
        return self._orders[task][1][position]


# ---- the loss of a mixed batch ------------------------------------------------------------------------
def mixed_loss(
    bank: MultiTaskModel,
    features: Sequence[dict[str, Any]],
    slots: Sequence[int],
    reduction: str = "mean",
    packing: bool = False,
) -> torch.Tensor:
    """The loss of rows of any tasks and kinds (``slots[i]`` is row i's slot in ``bank.slots``).

    ``mean``: classification CEs summed, plus the generation rows' token-mean NLL times their number,
    over the batch size. ``sum``: the sum of every classification row's CE and every target token's NLL.
    ``packing``: each generation task's rows end to end in one row (:func:`multitune.encode.pack`), a forward
    per task.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction}")
    pad_id = bank.base.tokenizer.pad_token_id
    device = bank.base.device
    kinds = [bank.tasks[bank.slots[s]].kind for s in slots]
    total = torch.zeros((), device=device)
    classified = [i for i, k in enumerate(kinds) if k == "classification"]
    generated = [i for i, k in enumerate(kinds) if k == "generation"]
    if classified:
        batch = to_device(
            collate([features[i] for i in classified], pad_id, [slots[i] for i in classified]), device
        )
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        total = total + F.cross_entropy(logits.float(), batch["class_labels"], reduction="sum")
    if generated and packing:
        nll, count = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        for slot in sorted({slots[i] for i in generated}):
            part = bank.lm_loss(
                to_device(pack([features[i] for i in generated if slots[i] == slot], slot), device)
            )
            nll, count = nll + part[0], count + part[1]
        total = total + (nll if reduction == "sum" else nll / count.clamp(min=1) * len(generated))
    elif generated:
        batch = to_device(
            collate([features[i] for i in generated], pad_id, [slots[i] for i in generated]), device
        )
        nll, count = bank.lm_loss(batch)
        total = total + (nll if reduction == "sum" else nll / count.clamp(min=1) * len(generated))
    return total if reduction == "sum" else total / len(features)


# ---- training -------------------------------------------------------------------------------------------
def _check_tasks(bank: MultiTaskModel, tasks: Mapping[str, Any]) -> None:
    if not tasks:
        raise ConfigError("no tasks to train; give at least one task of the bank")
    problems = []
    for name in tasks:
        if name not in bank.tasks:
            problems.append(
                f"task '{name}' is not in the bank (tasks: {', '.join(bank.tasks) or 'none'}); "
                "add it with bank.add_task first"
            )
        elif get_method(bank.tasks[name].method).changes_base:
            problems.append(
                f"task '{name}' uses {bank.tasks[name].method} fine-tuning, which owns the base and "
                "cannot share a batch with other tasks; train it alone with 'multitune train'"
            )
    if problems:
        raise ConfigError("; ".join(problems))


def _fit_once(
    bank: MultiTaskModel,
    tasks: Mapping[str, tuple[Sequence[Example], Sequence[Example]]],
    config: TrainConfig,
    metrics: Mapping[str, str],
) -> tuple[dict[str, TrainResult], list[dict[str, Any]]]:
    """The tasks whose method has nothing to optimise (prompting), fitted and scored once, at step 0, before the
    loop; returns their results and their records, which open metrics.jsonl (the preamble) so that the file
    holds every task of the run."""
    results: dict[str, TrainResult] = {}
    preamble: list[dict[str, Any]] = []
    for task, (train_examples, validation_examples) in tasks.items():
        fit_method = get_method(bank.tasks[task].method).fit
        if fit_method is not None:
            results[task] = judged(
                bank,
                task,
                fit_only(
                    bank, task, fit_method, train_examples, validation_examples, config, None, metrics[task]
                ),
                train_examples,
                validation_examples,
                None,
            )
            preamble += [{"task": task, **record} for record in results[task].history]
    return results, preamble


def _encode_mixture(
    bank: MultiTaskModel,
    tasks: Mapping[str, tuple[Sequence[Example], Sequence[Example]]],
    names: Sequence[str],
    max_length: int,
) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """Each optimised task's training features, encoded once, and its slot in the bank: what a RowSampler's
    (task index, example index) rows point at. A task without training examples, or with labels outside its
    label set, is refused here, before the first step."""
    features, slots = [], []
    for task in names:
        if not tasks[task][0]:
            raise ConfigError(f"task '{task}' has no training examples; give it some data")
        encoded = encode_task(bank, task, tasks[task][0], max_length)
        if bank.tasks[task].kind == "classification" and any("class_label" not in f for f in encoded):
            raise ConfigError(
                f"some training labels of task '{task}' are not in its label set {bank.tasks[task].labels}"
            )
        features.append(encoded)
        slots.append(bank.slots.index(task))
    return features, slots


def _validation_scores(
    bank: MultiTaskModel,
    tasks: Mapping[str, tuple[Sequence[Example], Sequence[Example]]],
    config: TrainConfig,
    metrics: Mapping[str, str],
) -> Callable[[str], dict[str, float] | None]:
    """The loop's evaluation of one task: its validation split (None without one), generating text only when
    the task's metric needs it (loss and perplexity do not)."""

    def scores(task: str) -> dict[str, float] | None:
        validation = tasks[task][1]
        if not validation:
            return None
        return evaluate(
            bank,
            task,
            validation,
            config.max_length,
            config.eval_batch_size,
            config.max_new_tokens,
            generate=metrics[task] not in ("loss", "perplexity"),
            spread=True,
        )

    return scores


def train_multitask(
    bank: MultiTaskModel,
    tasks: Mapping[str, tuple[Sequence[Example], Sequence[Example]]],
    config: TrainConfig,
    sampling: str = "proportional",
    temperature: float = 2.0,
    run_dir: str | Path | None = None,
    progress: bool = True,
    learning_rates: Mapping[str, float] | None = None,
    on_step: Callable[[int], None] | None = None,
    resume: bool = False,
) -> dict[str, TrainResult]:
    """Train the bank's ``tasks`` (name -> (train, validation) examples) together from mixed batches.

    ``learning_rates`` overrides the learning rate of some tasks (default: ``config.learning_rate``, else
    the method's). ``on_step(step)`` is called after each optimizer step. Methods with nothing to
    optimise (prompting) are fitted and scored once, at step 0. Returns each task's result: ``steps``
    is the step at which it was frozen (or the last step), ``stopped_early`` whether it was frozen.
    ``run_dir``: metrics.jsonl and the checkpoint; ``resume`` continues from that checkpoint.
    """
    _check_tasks(bank, tasks)
    unknown = sorted(set(learning_rates or {}) - set(tasks))
    if unknown:
        raise ConfigError(f"learning rates given for tasks not being trained: {', '.join(unknown)}")
    metrics = {t: config.metric or default_metric(bank.tasks[t].kind) for t in tasks}
    results, preamble = _fit_once(bank, tasks, config, metrics)
    names = [t for t in tasks if t not in results]
    if not names:
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preamble))
        return results
    probabilities = task_probabilities([len(tasks[t][0]) for t in names], sampling, temperature)
    features, slots = _encode_mixture(bank, tasks, names, config.max_length)
    rates = [
        (learning_rates or {}).get(t)
        or config.learning_rate
        or get_method(bank.tasks[t].method).default_learning_rate
        for t in names
    ]
    sampler = RowSampler([len(f) for f in features], probabilities, config.seed)
    micro = epoch_steps(config, sum(len(f) for f in features)) * config.grad_accum  # an epoch of the mixture

    def loss(rows: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, float]]:
        value = mixed_loss(
            bank, [features[t][i] for t, i in rows], [slots[t] for t, _ in rows], packing=config.packing
        )
        return value, {"loss": float(value.detach())}

    objective = Objective(
        names,
        rates,
        MixedBatches(sampler, config.batch_size, micro),
        loss,
        _validation_scores(bank, tasks, config, metrics),
        {t: metrics[t] for t in names},
    )
    results.update(
        fit(
            bank,
            objective,
            config,
            run_dir,
            resume,
            progress,
            f"train {len(names)} tasks",
            on_step=on_step,
            preamble=preamble,
        )
    )
    for t, rate in zip(names, rates, strict=True):
        judged(bank, t, results[t], tasks[t][0], tasks[t][1], rate, config.epochs)
    return {t: results[t] for t in tasks}


class MixedBatches:
    """The loop's batches of a multi-task run: ``batch_size`` rows drawn by a :class:`RowSampler` per micro-batch,
    ``micro`` micro-batches an epoch of the mixture. Its state (the sampler's generator and draw counts) goes into
    the checkpoint, so a resumed run draws the rows the uninterrupted one would have."""

    def __init__(self, sampler: RowSampler, batch_size: int, micro: int) -> None:
        self.sampler, self.batch_size, self.micro = sampler, batch_size, micro

    def count(self, epoch: int) -> int:
        return self.micro

    def get(self, epoch: int, index: int, active: Sequence[bool]) -> list[tuple[int, int]]:
        return self.sampler.draw(self.batch_size, active)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.sampler.generator.get_state(), "drawn": torch.tensor(self.sampler.drawn)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sampler.generator.set_state(state["generator"])
        self.sampler.drawn = [int(n) for n in state["drawn"]]


# ---- the whole job: a YAML of tasks -> a bank folder ----------------------------------------------------
@dataclass
class MultiRunConfig:
    """``multitune train-multi``: tasks trained together on one base; one adapter folder per task."""

    model: str = field(
        default="minilm", metadata={"help": "short name (minilm, smollm2-135m), HF folder or .gguf"}
    )
    output: str = field(default="runs/multi", metadata={"help": "bank folder: one adapter folder per task"})
    sampling: str = field(
        default="proportional", metadata={"help": "task of each row: proportional or temperature"}
    )
    temperature: float = field(default=2.0, metadata={"help": "temperature sampling: p ~ size^(1/T)"})
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: list[RunConfig] = field(default_factory=list)
    learning_rates: dict[str, float] = field(default_factory=dict)  # task -> its own learning rate


TASK_KEYS = ("name", "method", "kind", "data", "learning_rate")


def _task_config(
    entry: Any, index: int, model: str, train: TrainConfig, where: str
) -> tuple[RunConfig, float | None]:
    """One entry of ``tasks:`` -> a RunConfig: name, method, kind, learning_rate, and the data and method
    settings as ``multitune train``'s --config takes them (``data: FILE`` or a ``data:`` section,
    ``text_column: review``, ``lora_rank: 4`` or a ``lora:`` section)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"task {index + 1} in {where} must be a mapping with name, method, kind and data")
    entry = dict(entry)
    name = entry.pop("name", None)
    if not name:
        raise ConfigError(f"task {index + 1} in {where} has no name; add 'name: ...'")
    method = entry.pop("method", "lora")
    if method not in METHODS:
        raise ConfigError(
            f"task '{name}': unknown method '{method}'; choose one of: {', '.join(sorted(METHODS))}"
        )
    lr = entry.pop("learning_rate", None)
    kind = entry.pop("kind", "classification")
    if kind == "domain":  # its masks and objectives are single-task batches (training/train.py)
        raise ConfigError(
            f"task '{name}': train-multi does not train domain tasks (raw text); train it alone with "
            "'multitune train --kind domain'"
        )
    schema = settings_parser([(DataConfig, "data.")], [method])
    values = split_settings(
        settings_from_mapping(entry, schema, f"task '{name}' of {where}", known=TASK_KEYS)
    )
    run = RunConfig(model=model, task=str(name), kind=kind, method=method, output="", train=train)
    run.data = DataConfig(**values.get("data", {}))
    run.methods = {method: METHODS[method].config_class(**values.get(method, {}))}
    return run, (float(lr) if lr is not None else None)


def load_multi_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> MultiRunConfig:
    """Read the YAML of ``train-multi``; ``overrides`` (given flags: model, output, sampling, temperature,
    ``train.*``) replace its values. Every problem of every task is reported at once."""
    path = Path(path)
    raw = read_yaml_mapping(path, "a mapping with 'tasks:' and shared settings")
    where = f"config file {path}"
    entries = raw.pop("tasks", None)
    # shared settings flat (epochs: 2) or in train:, as every --config takes them; then the flags given
    values = settings_from_mapping(
        raw, settings_parser([(MultiRunConfig, ""), (TrainConfig, "train.")]), where, known=["tasks"]
    )
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    shared = split_settings(values)
    config = MultiRunConfig(**shared.get("", {}))
    config.train = TrainConfig(**shared.get("train", {}))
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{where} lists no tasks; add 'tasks:' with one entry (name, method, kind, data) per task"
        )
    built = [_task_config(e, i, config.model, config.train, where) for i, e in enumerate(entries)]
    config.tasks = [run for run, _ in built]
    config.learning_rates = {run.task_name: lr for run, lr in built if lr is not None}
    problems = []
    names = [t.task_name for t in config.tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(
            f"task names must be unique: {', '.join(duplicates)} given more than once; rename them"
        )
    for task in config.tasks:
        try:
            validate(task)
        except ConfigError as error:
            problems.append(f"task '{task.task}': {error}")
        if METHODS[task.method].changes_base:
            problems.append(
                f"task '{task.task}': {task.method} fine-tuning owns the base and cannot train with "
                "other tasks; train it alone with 'multitune train'"
            )
        for role in ("data", "validation_data", "test_data"):
            file = getattr(task.data, role)
            if role == "data" and not file:
                problems.append(f"task '{task.task}' has no training data; add 'data: FILE'")
            elif file and not Path(file).is_file():
                problems.append(f"task '{task.task}': {role.replace('_', ' ')} file {file} not found")
    if config.sampling not in SAMPLING:
        problems.append(f"sampling must be one of {', '.join(SAMPLING)} (got '{config.sampling}')")
    if not config.temperature > 0:
        problems.append(f"temperature must be > 0 (got {config.temperature})")
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def _to_yaml(config: MultiRunConfig) -> str:
    tasks = []
    for run in config.tasks:
        entry: dict[str, Any] = {
            "name": run.task,
            "method": run.method,
            "kind": run.kind,
            "data": settings_dict(run.data),
            run.method: settings_dict(run.method_config()),
        }
        if run.task in config.learning_rates:
            entry["learning_rate"] = config.learning_rates[run.task]
        tasks.append(entry)
    data = {
        "model": config.model,
        "output": config.output,
        "sampling": config.sampling,
        "temperature": config.temperature,
        "train": dataclasses.asdict(config.train),
        "tasks": tasks,
    }
    return yaml.safe_dump(data, sort_keys=False)


BANK_MARK = "# multitune train-multi bank folder: the settings of this run\n"


def run_multitask(config: MultiRunConfig, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Data -> base -> tasks -> train together -> test each -> OUTPUT/TASK adapters; the summary is
    written to OUTPUT/result.json (OUTPUT/config.yaml and OUTPUT/metrics.jsonl beside the adapters).
    ``resume`` continues an interrupted run in OUTPUT from its checkpoint (a finished one returns its result)."""
    out = Path(config.output)
    with output_lock(out, "multitune train-multi"):
        return _run_multitask(config, out, progress, resume)


def _is_bank_run(folder: Path) -> bool:
    try:
        return (folder / "config.yaml").read_text().startswith(BANK_MARK)
    except OSError:
        return False


def _run_multitask(config: MultiRunConfig, out: Path, progress: bool, resume: bool) -> dict[str, Any]:
    from multitune.models import load_base

    used = out.exists() and any(out.iterdir())
    if used and not (resume and _is_bank_run(out)):
        from multitune.storage import describe_folder

        hint = "pass --resume to continue it, or " if _is_bank_run(out) else ""
        what = (
            "--resume continues a run of 'multitune train-multi', but the folder"
            if resume
            else f"output folder {out} already exists and"
        )
        raise ConfigError(f"{what} is {describe_folder(out)}; {hint}choose another --output")
    if used and (out / "result.json").exists():  # finished: its result, no checkpoint left behind
        if not config.train.keep_checkpoint:
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        return json.loads((out / "result.json").read_text())
    splits = {
        t.task_name: t.data.splits(task_kind(t.kind)) for t in config.tasks
    }  # every data file read before the model loads
    device = None if config.train.device == "auto" else config.train.device
    base = load_base(config.model, device=device, quantize=config.train.quantize)
    torch.manual_seed(config.train.seed)
    bank = MultiTaskModel(base)
    for t in config.tasks:
        bank.add_task(t.task_name, task_kind(t.kind), t.method, t.method_config(), splits[t.task_name].labels)
    trainable = {t: sum(p.numel() for p in bank.task_parameters(t).values()) for t in splits}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(BANK_MARK + _to_yaml(config))
    results = train_multitask(
        bank,
        {t: (s.train, s.validation) for t, s in splits.items()},
        config.train,
        config.sampling,
        config.temperature,
        out,
        progress,
        config.learning_rates,
        resume=resume,
    )
    summary: dict[str, Any] = {
        "model": config.model,
        "quantize": config.train.quantize,
        "sampling": config.sampling,
        "tasks": {},
    }
    for t in config.tasks:
        name, result = t.task_name, results[t.task_name]
        test = evaluate(
            bank,
            name,
            splits[name].test,
            config.train.max_length,
            config.train.eval_batch_size,
            config.train.max_new_tokens,
        )
        save_adapter(bank, name, out / name, extra={"metrics": {"test": test}})
        s = splits[name]
        save_task_profile(  # the drift monitor's reference (multitune.health.profile)
            bank,
            name,
            out / name,
            s.validation,
            s.train,
            config.train.max_length,
            config.train.eval_batch_size,
        )
        # what `multitune update` measures forgetting on and rehearses (multitune.health.kept)
        kept.keep(out / name / DATA, s, asdict(t.data), config.train.seed, t.data.keep_replay)
        summary["tasks"][name] = {
            "method": t.method,
            "kind": t.kind,
            "examples": {"train": len(s.train), "validation": len(s.validation), "test": len(s.test)},
            "trainable_parameters": trainable[name],
            "steps": result.steps,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "train_seconds": round(result.seconds, 2),
            "validation": {result.metric: result.best_metric},
            "test": test,
            "learned": result.problem is None,
            "problem": result.problem,
        }
    write_json_atomic(out / "result.json", summary)
    if not config.train.keep_checkpoint:  # done: the adapters are what is kept (--keep-checkpoint)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    return summary
