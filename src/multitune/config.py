"""Typed configs: the single source of YAML files, CLI flags and ``--help`` text.

A run is described by :class:`RunConfig`, whose sections are small dataclasses. Each field's
``metadata["help"]`` is its help text; :func:`add_arguments` turns the fields into flags
(``--lora-rank`` for ``lora.rank``, ``--epochs`` for ``train.epochs``), and :func:`load_run_config`
merges defaults < YAML file < flags. :func:`validate` reports every problem at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitune.data import Columns, Splits, prepare_splits
from multitune.errors import ConfigError
from multitune.methods import METHODS


@dataclass
class DataConfig:
    data: str | None = field(default=None, metadata={"help": "training data file (.csv .tsv .json .jsonl .parquet)"})
    validation_data: str | None = field(default=None, metadata={"help": "validation file (default: split from --data)"})
    test_data: str | None = field(default=None, metadata={"help": "test file (default: split from --data)"})
    text_column: str | None = field(default=None, metadata={"help": "column with the input text (default: auto)"})
    text_pair_column: str | None = field(default=None, metadata={"help": "column with a second text, for pairs"})
    label_column: str | None = field(default=None, metadata={"help": "column with the class label (default: auto)"})
    prompt_column: str | None = field(default=None, metadata={"help": "generation: prompt or instruction column"})
    input_column: str | None = field(default=None, metadata={"help": "generation: extra input appended to the prompt"})
    response_column: str | None = field(default=None, metadata={"help": "generation: target text column"})
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1],
                               metadata={"help": "train,validation,test ratios when splitting one file"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/validation/test split"})
    drop_empty: bool = field(default=False, metadata={"help": "drop rows with an empty text or label"})
    max_examples: int | None = field(default=None, metadata={"help": "use at most N training examples"})

    def splits(self, kind: str) -> Splits:
        """Read, validate and split the data as these settings say."""
        if not self.data:
            raise ConfigError("no training data given; pass --data FILE (.csv .tsv .json .jsonl .parquet)")
        columns = Columns(self.text_column, self.text_pair_column, self.label_column, self.prompt_column,
                          self.input_column, self.response_column)
        return prepare_splits(self.data, kind, columns, self.validation_data, self.test_data,  # type: ignore[arg-type]
                              tuple(self.split), self.split_seed, self.drop_empty, self.max_examples)


@dataclass
class TrainConfig:
    epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after N optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per forward pass in evaluation"})
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps of linear warmup"})
    scheduler: str = field(default="linear", metadata={"help": "learning-rate decay: linear, cosine or constant"})
    grad_accum: int = field(default=1, metadata={"help": "batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    eval_every: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: each epoch)"})
    patience: int = field(default=3, metadata={"help": "evaluations without improvement before stopping"})
    metric: str | None = field(default=None, metadata={"help": "early-stopping metric (default: accuracy or loss)"})
    checkpoint_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps"})
    max_length: int = field(default=128, metadata={"help": "truncate inputs to N tokens"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation: tokens to generate in evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})


@dataclass
class RunConfig:
    model: str = field(default="minilm", metadata={"help": "short name (minilm, smollm2-135m), HF folder or .gguf"})
    task: str = field(default="task", metadata={"help": "task name (letters, digits, _ and -)"})
    kind: str = field(default="classification", metadata={"help": "classification or generation"})
    method: str = field(default="lora", metadata={"help": "adaptation method: " + ", ".join(sorted(METHODS))})
    output: str = field(default="runs/run", metadata={"help": "run folder: config, metrics, checkpoints, adapter"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> its config dataclass

    def method_config(self) -> Any:
        return self.methods.get(self.method) or METHODS[self.method].config_class()


def _flag_type(tp: Any) -> tuple[Any, str | None]:
    """(argparse type, nargs) for a field's annotation; lists are comma-separated."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return (lambda s: [inner(x) for x in s.split(",") if x]), None
    if tp is bool:
        return _parse_bool, None
    return tp, None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or f.name == "methods":
            continue
        f.type = hints[f.name]
        out.append(f)
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", dest_prefix: str = "") -> None:
    """One flag per dataclass field; defaults stay None so that only given flags override."""
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or "options")
    for f in _fields(cls):
        kind, _ = _flag_type(f.type)
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if list in (typing.get_origin(f.type), *map(typing.get_origin, typing.get_args(f.type))):
            help_text = f"{f.metadata.get('help', '')}, comma-separated (default: {default})"
        group.add_argument(flag, dest=dest_prefix + f.name, type=kind, default=None, metavar=f.name.upper(),
                           help=help_text)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of these settings; flags override it")
    add_arguments(parser, RunConfig)
    add_arguments(parser, DataConfig, dest_prefix="data.")
    add_arguments(parser, TrainConfig, dest_prefix="train.")
    for name, method in sorted(METHODS.items()):
        add_arguments(parser, method.config_class, prefix=f"{name}-", dest_prefix=f"methods.{name}.")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}")
    return cls(**values)


def read_yaml_mapping(path: str | Path, expected: str) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold {expected}")
    return raw


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the YAML file of ``--config``, then the flags that were given."""
    raw = read_yaml_mapping(args.config, "a mapping of settings") if getattr(args, "config", None) else {}
    sections: dict[str, dict[str, Any]] = {"data": dict(raw.pop("data", None) or {}),
                                          "train": dict(raw.pop("train", None) or {})}
    method_raw = {name: dict(raw.pop(name, None) or {}) for name in METHODS}
    for key, value in vars(args).items():
        if value is None or key == "config" or key.startswith("_"):
            continue
        section, _, name = key.rpartition(".")
        if section.startswith("methods."):
            method_raw[section.split(".", 1)[1]][name] = value
        elif section:
            sections[section][name] = value
        elif key in {f.name for f in _fields(RunConfig)}:
            raw[key] = value
    where = f"config file {args.config}" if getattr(args, "config", None) else "the settings"
    config = _build(RunConfig, raw, where)
    config.data = _build(DataConfig, sections["data"], f"{where} (data)")
    config.train = _build(TrainConfig, sections["train"], f"{where} (train)")
    config.methods = {n: _build(METHODS[n].config_class, v, f"{where} ({n})") for n, v in method_raw.items()}
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Raise one ConfigError that lists every problem of the config, each with its fix."""
    problems: list[str] = []
    if config.method not in METHODS:
        problems.append(f"unknown method '{config.method}'; choose one of: {', '.join(sorted(METHODS))}")
    else:
        problems += config.method_config().validate()
    if config.kind not in ("classification", "generation"):
        problems.append(f"kind must be classification or generation (got '{config.kind}')")
    t = config.train
    for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "checkpoint_every", "max_length"):
        if getattr(t, name) < 1:
            problems.append(f"{name} must be >= 1 (got {getattr(t, name)}); fix --{name.replace('_', '-')}")
    if t.learning_rate is not None and t.learning_rate <= 0:
        problems.append(f"learning_rate must be > 0 (got {t.learning_rate})")
    if t.scheduler not in ("linear", "cosine", "constant"):
        problems.append(f"scheduler must be linear, cosine or constant (got '{t.scheduler}')")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    if t.patience < 1:
        problems.append(f"patience must be >= 1 (got {t.patience})")
    d = config.data
    if len(d.split) != 3 or any(r < 0 for r in d.split) or abs(sum(d.split) - 1) > 1e-6:
        problems.append(f"split must be three non-negative ratios summing to 1, e.g. 0.8,0.1,0.1 (got {d.split})")
    if problems:
        raise ConfigError("; ".join(problems))


def to_yaml(config: RunConfig) -> str:
    data = dataclasses.asdict(config)
    data.pop("methods")
    data[config.method] = dataclasses.asdict(config.method_config())
    return yaml.safe_dump(data, sort_keys=False)
