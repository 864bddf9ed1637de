"""Typed configs: the single source of YAML files, CLI flags and ``--help`` text.

A run is described by :class:`RunConfig`, whose sections are small dataclasses; each field's
``metadata["help"]`` is its help text. :mod:`multitune.flags` turns the fields into flags and reads config
files; :func:`validate` reports every problem of a config at once; :func:`to_yaml` writes it back.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitune.data import KINDS, Columns, Splits, TaskKind, prepare_splits
from multitune.errors import ConfigError
from multitune.methods import METHODS
from multitune.trackers import check_installed, parse_report_to

_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
DEVICE_HELP = "where to run: cpu, cuda (or cuda:N) or auto, which takes cuda when available"


@dataclass
class DataConfig:
    data: str | None = field(
        default=None,
        metadata={"help": "training data file (.csv .tsv .json .jsonl .parquet; .txt for --kind domain)"},
    )
    validation_data: str | None = field(
        default=None, metadata={"help": "validation file (default: split from --data)"}
    )
    test_data: str | None = field(default=None, metadata={"help": "test file (default: split from --data)"})
    text_column: str | None = field(
        default=None, metadata={"help": "column with the input text (default: auto)"}
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "column with a second text, for pairs"}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "column with the class label (default: auto)"}
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "generation: prompt or instruction column"}
    )
    input_column: str | None = field(
        default=None, metadata={"help": "generation: extra input appended to the prompt"}
    )
    response_column: str | None = field(default=None, metadata={"help": "generation: target text column"})
    split: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1],
        metadata={"help": "train,validation,test ratios when splitting one file"},
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the train/validation/test split"})
    drop_empty: bool = field(default=False, metadata={"help": "drop rows with an empty text or label"})
    max_examples: int | None = field(default=None, metadata={"help": "use at most N training examples"})
    keep_replay: bool = field(
        default=True,
        metadata={
            "help": "keep the test split and a sample of the training rows beside the adapter (data/), for "
            "'multitune update' to measure forgetting and rehearse"
        },
    )
    counterfactual_augment: bool = field(
        default=False,
        metadata={
            "help": "add each training row's counterfactuals (he <-> she, ...) with its label: a mitigation of "
            "bias (docs/risks.md)"
        },
    )
    counterfactual_attributes: list[str] | None = field(
        default=None,
        metadata={
            "help": "attributes to augment: gender,nationality,religion,age (default: all, or only "
            "--counterfactual-lexicon's pairs)"
        },
    )
    counterfactual_lexicon: str | None = field(
        default=None,
        metadata={"help": "augment with your own swaps: a CSV/TSV of two columns, term,counterpart"},
    )
    counterfactual_language: str = field(
        default="en", metadata={"help": "language of the built-in lexicons: en or it"}
    )
    canaries: int | None = field(
        default=None,
        metadata={
            "help": "generation: plant N random secrets ('my secret code #i is 4 8 1 5 9 2') in the training "
            "rows, for 'multitune audit --canaries' to measure their exposure (docs/risks.md)"
        },
    )
    canary_repeats: int = field(default=5, metadata={"help": "times each canary is inserted"})
    golden: str | None = field(
        default=None,
        metadata={
            "help": "a golden set: inputs with their reference outputs (a data file of the task's columns), "
            "scored at the end of train and on every version by update, whose gate refuses a version that "
            "falls more than --max-golden-drop points on it (risks/golden.py)"
        },
    )

    def columns(self) -> Columns:
        """The column flags, as the data readers take them."""
        return Columns(
            self.text_column,
            self.text_pair_column,
            self.label_column,
            self.prompt_column,
            self.input_column,
            self.response_column,
        )

    def splits(self, kind: TaskKind, known_labels: Sequence[str] = ()) -> Splits:
        """Read, validate and split the data as these settings say (``known_labels``: the task's own, for
        an update: see :func:`multitune.data.prepare_splits`)."""
        if not self.data:
            raise ConfigError("no training data given; pass --data FILE (.csv .tsv .json .jsonl .parquet)")
        columns = self.columns()
        return prepare_splits(
            self.data,
            kind,
            columns,
            self.validation_data,
            self.test_data,
            tuple(self.split),
            self.split_seed,
            self.drop_empty,
            self.max_examples,
            known_labels,
        )


@dataclass
class TrainConfig:
    epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after N optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per forward pass in evaluation"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "peak learning rate (default: the method's)"}
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "classification head's learning rate (default: the method's, but at least 1e-3: a fresh "
            "head learns from scratch)"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps of linear warmup"})
    scheduler: str = field(
        default="linear", metadata={"help": "learning-rate decay: linear, cosine or constant"}
    )
    grad_accum: int = field(default=1, metadata={"help": "batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    eval_every: int | None = field(
        default=None, metadata={"help": "evaluate every N steps (default: each epoch)"}
    )
    patience: int = field(default=3, metadata={"help": "evaluations without improvement before stopping"})
    metric: str | None = field(
        default=None, metadata={"help": "early-stopping metric (default: accuracy or loss)"}
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "write a resumable checkpoint every N steps"}
    )
    keep_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "keep RUN/checkpoint when the run has finished (default: removed, the adapter is what is kept)"
        },
    )
    max_length: int = field(default=128, metadata={"help": "truncate inputs to N tokens"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each transformer block in the backward pass instead of keeping its "
            "activations: less memory for about one more forward per step"
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "generation on a decoder: each training batch's examples end to end in one row, position ids "
            "restarting per example and attention kept within it (no padding computed); not with prompt/prefix"
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "generation: tokens to generate in evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "keep the frozen base's linear layers in 4 or 8 bits (bitsandbytes): nf4, fp4 or int8 "
            "(QLoRA); adapter methods only"
        },
    )
    dp_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "train with differential privacy (DP-SGD: per-sample clipping, Gaussian noise, Poisson "
            "batches) to this epsilon; adapter methods only (docs/risks.md)"
        },
    )
    dp_delta: float | None = field(
        default=None,
        metadata={"help": "DP delta, below 1/n (default: 1/n^1.1 or 1e-5, whichever is smaller)"},
    )
    dp_max_grad_norm: float = field(
        default=1.0, metadata={"help": "DP: each example's gradient clipped to this norm"}
    )
    dp_accountant: str = field(
        default="prv", metadata={"help": "DP privacy accountant (Opacus'): prv or rdp"}
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers for losses, metrics and learning rate: tensorboard (RUN/tensorboard), "
            "mlflow (MLFLOW_TRACKING_URI, else a file store in RUN/mlruns), both comma-separated, or none"
        },
    )


@dataclass
class RunConfig:
    model: str = field(
        default="minilm", metadata={"help": "short name (minilm, smollm2-135m), HF folder or .gguf"}
    )
    task: str | None = field(
        default=None,
        metadata={"help": "task name: letters, digits, _ and - (default: the --output folder's name)"},
    )
    kind: str = field(
        default="classification",
        metadata={
            "help": "classification, generation, or domain: self-supervised on raw text (a .txt of one document "
            "per line, or a table's text column) to adapt the base to a domain before a labelled task"
        },
    )
    domain_objective: str | None = field(
        default=None,
        metadata={
            "help": "--kind domain: clm (decoders: next-token loss), mlm (encoders: BERT's masked LM) or simcse "
            "(encoders: unsupervised SimCSE); default: clm on a decoder, mlm on an encoder"
        },
    )
    method: str = field(default="lora", metadata={"help": "adaptation method: " + ", ".join(sorted(METHODS))})
    stack_on: str | None = field(
        default=None,
        metadata={
            "help": "a run folder whose task this one runs on top of, frozen (a --kind domain adapter: MAD-X's "
            "domain + task adapters); its adapter stays where it is and is loaded with this task"
        },
    )
    output: str = field(
        default="runs/run", metadata={"help": "run folder: config, metrics, checkpoints, adapter"}
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> its config dataclass

    def __post_init__(self) -> None:
        if self.task is None:  # two runs copied into one bank must not both be called "task"
            self.task = task_name_from_folder(self.output)

    @property
    def task_name(self) -> str:
        """``task``, which ``__post_init__`` fills in (the field admits None only so that it may be left out)."""
        if self.task is None:  # set back to None after construction
            raise ConfigError("the run has no task name; pass --task NAME")
        return self.task

    def method_config(self) -> Any:
        return self.methods.get(self.method) or METHODS[self.method].config_class()


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # the bank's rule for task names


def task_name_from_folder(folder: str | Path, fallback: str = "task") -> str:
    """The default task name of a run: its output folder's name, made to fit the task-name rule.

    Characters outside ``[A-Za-z0-9_-]`` become ``-``, leading ``_``/``-`` go, the name is cut to 64
    characters; a folder whose name has nothing left (``.``, ``...``) gives ``fallback``.
    """
    name = Path(folder).name or Path(folder).resolve().name
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", name).lstrip("_-")[:64].rstrip("-")
    return name if TASK_NAME.fullmatch(name) else fallback


def validate(config: RunConfig) -> None:
    """Raise one ConfigError that lists every problem of the config, each with its fix."""
    problems: list[str] = []
    if config.method not in METHODS:
        problems.append(f"unknown method '{config.method}'; choose one of: {', '.join(sorted(METHODS))}")
    else:
        problems += config.method_config().validate()
    problems += kind_problems(config.kind, config.domain_objective)
    if not TASK_NAME.fullmatch(config.task or ""):
        problems.append(
            f"task name '{config.task}' must be letters, digits, _ and - (at most 64, starting with a "
            "letter or digit); fix --task"
        )
    t = config.train
    for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "checkpoint_every", "max_length"):
        if getattr(t, name) < 1:
            problems.append(f"{name} must be >= 1 (got {getattr(t, name)}); fix --{name.replace('_', '-')}")
    for name in ("learning_rate", "head_learning_rate"):
        if getattr(t, name) is not None and not getattr(t, name) > 0:  # (not > 0: nan too)
            problems.append(f"{name} must be > 0 (got {getattr(t, name)}); fix --{name.replace('_', '-')}")
    if t.scheduler not in ("linear", "cosine", "constant"):
        problems.append(f"scheduler must be linear, cosine or constant (got '{t.scheduler}')")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    if t.patience < 1:
        problems.append(f"patience must be >= 1 (got {t.patience})")
    device = device_problem(t.device)
    if device:
        problems.append(device)
    try:
        check_installed(parse_report_to(t.report_to))
    except ConfigError as error:
        problems.append(str(error))
    problems += quantize_problems(t.quantize, config.method)
    if t.packing and (
        config.kind not in ("generation", "domain")
        or config.domain_objective not in (None, "clm")
        or config.method in ("prompt", "prefix", "prompting")
    ):
        problems.append(
            "--packing packs generation examples end to end in a row: it needs --kind generation (or domain on a "
            "decoder) and a method that adds no virtual positions (not prompt, prefix or prompting)"
        )
    d = config.data
    if len(d.split) != 3 or any(r < 0 for r in d.split) or abs(sum(d.split) - 1) > 1e-6:
        problems.append(
            f"split must be three non-negative ratios summing to 1, e.g. 0.8,0.1,0.1 (got "
            f"{','.join(map(str, d.split))})"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def kind_problems(kind: str, objective: str | None) -> list[str]:
    """What is wrong with ``--kind`` and ``--domain-objective`` (whether the objective fits the base is
    :func:`multitune.domain.objective_for`'s to say, once the base is loaded)."""
    if kind not in KINDS:
        return [f"kind must be classification, generation or domain (got '{kind}')"]
    if objective is not None and kind != "domain":
        return [f"--domain-objective is for --kind domain (this task is {kind}); drop it"]
    if objective not in (None, "clm", "mlm", "simcse"):
        return [f"domain_objective must be clm, mlm or simcse (got '{objective}'); fix --domain-objective"]
    return []


def quantize_problems(quantize: str | None, method: str) -> list[str]:
    """What is wrong with ``--quantize`` for ``method``: an unknown kind, or a method that trains the base."""
    if quantize is not None and quantize not in ("nf4", "fp4", "int8"):
        return [f"quantize must be nf4, fp4 or int8 (got '{quantize}'); fix --quantize"]
    if quantize and method in METHODS and METHODS[method].changes_base:
        return [f"{method} trains the base's weights, which --quantize keeps in 4 or 8 bits; drop --quantize"]
    return []


def settings_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass's settings (not its internal state) as plain data, for YAML."""
    return {f.name: dataclasses.asdict(obj)[f.name] for f in setting_fields(type(obj))}


def to_yaml(config: RunConfig) -> str:
    """The run's settings in the nested layout that ``--config`` reads back (``multitune train --config
    RUN/config.yaml`` repeats the run)."""
    data: dict[str, Any] = settings_dict(config)
    data["data"] = settings_dict(config.data)
    data["train"] = settings_dict(config.train)
    method = settings_dict(config.method_config())
    if method:
        data[config.method] = method
    return yaml.safe_dump(data, sort_keys=False)


def device_problem(device: str) -> str | None:
    """Why ``device`` is not a device name every command accepts, or None."""
    if _DEVICE.fullmatch(device):
        return None
    return f"device must be cpu, cuda, cuda:N or auto (got '{device}'); fix --device"


def setting_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are user settings (flags, YAML keys, ``methods`` listing).

    A setting is a field with help text (``metadata={"help": ...}``); sections (DataConfig inside
    RunConfig), tables (RunConfig's ``methods``) and state a method writes for itself (prompting's shot
    pool) have none and are never flags. A dataclass-typed field is never a setting.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help") or any(
            dataclasses.is_dataclass(m) for m in type_members(hints[f.name])
        ):
            continue
        f.type = hints[f.name]
        out.append(f)
    return out


def type_members(tp: Any) -> list[Any]:
    """The types a field's annotation allows (``int | None`` -> [int, None])."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [None if a is type(None) else a for a in typing.get_args(tp)]
    return [tp]


def plural(count: int, unit: str) -> str:
    """``1 step``, ``2 steps``, ``1,000 pairs``: counts in the commands' messages read as English."""
    return f"{count:,} {unit}" + ("" if count == 1 else "s")
