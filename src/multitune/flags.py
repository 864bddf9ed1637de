"""Flags and config files from the typed configs: one mechanism for every command.

Each field of a config dataclass is a flag (:func:`add_arguments`: ``--lora-rank`` for ``lora.rank``,
``--epochs`` for ``train.epochs``; a bool is a pair of flags, ``--lora-rslora`` / ``--no-lora-rslora``) whose
default is None, so that only flags given override; its ``metadata["help"]`` is the help text, its default
shown once. :func:`load_run_config` builds a :class:`~multitune.config.RunConfig` from the parsed flags.

Config files: ``--config FILE`` (:func:`add_config_argument`) takes every flag of its command, as a flat
key named as the flag (``max_steps: 3`` for ``--max-steps``, ``lora_rank: 4``) or inside a section named
after the first part of the flag's destination (``train: {max_steps: 3}``, ``lora: {rank: 4}``, ``data:
{data: my.csv}``), which is the layout a run writes to ``config.yaml``. :func:`parse_args` reads the file
against the command's own flags and makes its values the defaults of a second parse: defaults < file <
flags. Every problem is one line naming the key (and the close match).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from multitune.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    setting_fields,
    settings_dict,
    type_members,
    validate,
)
from multitune.errors import ConfigError
from multitune.methods import METHODS

_OWNER = "_config_parser"  # namespace attribute: the (sub)parser whose --config was given
_NOT_SETTINGS = ("config", "func", "quiet", "command")  # how a command runs, not what it computes


def _flag_type(tp: Any) -> Any:
    """The argparse type of a field's annotation; lists are comma-separated."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return lambda s: [inner(x.strip()) for x in s.split(",") if x.strip()]
    return tp


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is dataclasses.MISSING:  # internal invariant: every setting has a default
        raise TypeError(f"setting {f.name} has no default")
    return f.default_factory()


def show_default(value: Any) -> str | None:
    """A default as a user would type it, or None when there is nothing to show (no default)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, str) and (not value or not value.isprintable() or value != value.strip()):
        return repr(value)  # '\n\n', '' or ' x': an invisible default is shown quoted and escaped
    return str(value)


def setting_help(text: str, default: Any, is_list: bool = False) -> str:
    """A flag's help: its text, ``comma-separated`` for lists, and its default unless the text says it."""
    if is_list and "comma-separated" not in text:
        head, sep, tail = text.partition("; default:")
        text = f"{head}, comma-separated{sep}{tail}"
    shown = show_default(default)
    if shown is not None and "default:" not in text:
        text += f" (default: {shown})"
    return text


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", dest_prefix: str = ""
) -> None:
    """One flag per setting of ``cls``; bools are ``--x`` / ``--no-x``.

    Defaults stay None, so that only the flags given override a config file and the dataclass defaults;
    each action keeps the field's annotation (``action.annotation``) to check a config file's values.
    """
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or "options")
    for f in setting_fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        is_list = any(typing.get_origin(m) is list for m in type_members(f.type))
        help_text = _escape(setting_help(f.metadata.get("help", ""), field_default(f), is_list))
        if f.type is bool:
            action = group.add_argument(
                flag,
                dest=dest_prefix + f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            action = group.add_argument(
                flag,
                dest=dest_prefix + f.name,
                type=_flag_type(f.type),
                default=None,
                metavar=f.name.upper(),
                help=help_text,
            )
        action.annotation = f.type  # type: ignore[attr-defined]


def add_method_arguments(
    parser: argparse.ArgumentParser, methods: typing.Iterable[str] | None = None
) -> None:
    """The flags of each method's settings (``--lora-rank``), of ``methods`` or of every registered one."""
    for name in sorted(METHODS if methods is None else methods):
        add_arguments(parser, METHODS[name].config_class, prefix=f"{name}-", dest_prefix=f"methods.{name}.")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    add_arguments(parser, RunConfig)
    add_arguments(parser, DataConfig, dest_prefix="data.")
    add_arguments(parser, TrainConfig, dest_prefix="train.")
    add_method_arguments(parser)


class ConfigFileAction(argparse.Action):
    """``--config FILE``: stores the path and remembers the parser it belongs to (a subcommand's), so that
    :func:`parse_args` reads the file against that command's flags and no other's."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, _OWNER, parser)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action=ConfigFileAction,
        metavar="FILE",
        help="YAML file of settings: any flag of this command as a key named as the flag "
        "(max_steps: 3, lora_rank: 4) or in its section (train: {max_steps: 3}, lora: {rank: 4}), "
        "as a run's config.yaml holds them; flags given override it",
    )


def parse_args(
    parser: argparse.ArgumentParser, argv: typing.Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``; when it gives ``--config FILE``, the file's settings become the defaults of a second
    parse, so that the flags given still win. A bad file raises ConfigError (one line)."""
    args = parser.parse_args(argv)
    owner = vars(args).pop(_OWNER, None)
    if owner is None or not args.config:
        return args
    owner.set_defaults(
        **settings_from_mapping(
            read_yaml_mapping(args.config, "a mapping of settings"), owner, f"config file {args.config}"
        )
    )
    args = parser.parse_args(argv)
    vars(args).pop(_OWNER, None)
    return args


def _settable(
    parser: argparse.ArgumentParser,
) -> tuple[dict[str, argparse.Action], dict[str, dict[str, argparse.Action]]]:
    """(flat keys, sections) of a parser's flags: ``max_steps`` and ``train: max_steps`` for ``--max-steps``
    (destination ``train.max_steps``); ``lora_rank`` and ``lora: rank`` for ``methods.lora.rank``."""
    flat: dict[str, argparse.Action] = {}
    sections: dict[str, dict[str, argparse.Action]] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "config", argparse.SUPPRESS):
            continue
        flat[longs[0][2:].replace("-", "_")] = action
        parts = action.dest.split(".")
        if len(parts) > 1:
            sections.setdefault(parts[1] if parts[0] == "methods" else parts[0], {})[parts[-1]] = action
    return flat, sections


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def settings_parser(
    sections: typing.Sequence[tuple[type, str]], methods: typing.Iterable[str] = ()
) -> argparse.ArgumentParser:
    """A parser that only describes settings (never parses a command line): the flags of each
    ``(config class, destination prefix)`` and of ``methods``, for :func:`settings_from_mapping` to check a
    mapping against where no command's parser applies (the task entries of ``train-multi``)."""
    parser = argparse.ArgumentParser(add_help=False)
    for cls, dest_prefix in sections:
        add_arguments(parser, cls, dest_prefix=dest_prefix)
    add_method_arguments(parser, methods)
    return parser


def split_settings(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.epochs": 2, "methods.lora.rank": 4, "model": m}`` -> ``{"train": {"epochs": 2}, "lora":
    {"rank": 4}, "": {"model": m}}``: values by destination, grouped as the config dataclasses take them."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        parts = dest.split(".")
        parts = parts[1:] if parts[0] == "methods" else parts
        out.setdefault(parts[0] if len(parts) > 1 else "", {})[parts[-1]] = value
    return out


def settings_from_mapping(
    raw: dict[str, Any],
    parser: argparse.ArgumentParser,
    where: str,
    ignore: typing.Iterable[str] = (),
    known: typing.Iterable[str] = (),
) -> dict[str, Any]:
    """The values of a config mapping by flag destination (``{"train.max_steps": 3}``), checked against
    ``parser``'s flags: flat keys named as the flags or sections, every problem in one ConfigError.

    ``data`` is the data file when it is a string and the data section when it is a mapping. A section
    named after a method that has no flags here (``base: {}`` of a written config) may be empty. Keys in
    ``ignore`` are skipped; ``known`` are the other keys the caller takes (out of ``raw`` before the call),
    offered when a key is misspelt.
    """
    flat, sections = _settable(parser)
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    unknown: list[str] = []
    problems: list[str] = []

    def put(action: argparse.Action, value: Any, name: str) -> None:
        if action.dest in given:
            problems.append(f"{name} is given twice (also as {given[action.dest]}); keep one")
            return
        given[action.dest] = name
        try:
            values[action.dest] = _convert(action, value, name)
        except ValueError as error:
            problems.append(str(error))

    ignored = set(ignore)
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in ignored:
            continue
        if name in sections and (isinstance(value, dict) or (value is None and name not in flat)):
            for sub, sub_value in (value or {}).items():  # an empty section ("lora:") sets nothing
                field_name = str(sub).replace("-", "_")
                if field_name in sections[name]:
                    put(sections[name][field_name], sub_value, f"{name}.{field_name}")
                else:
                    unknown.append(f"{sub} in {name}:{_suggest(field_name, sections[name])}")
        elif name in flat:
            put(flat[name], value, name)
        elif name in sections:
            problems.append(
                f"'{name}:' must be a section of settings such as {', '.join(list(sections[name])[:3])} "
                f"(got {type(value).__name__}); or give them flat ({next(iter(sections[name]))}: ...)"
            )
        elif name in METHODS and not value:
            continue
        elif name in METHODS:
            unknown.append(f"{key}: (the settings of a method this command does not offer)")
        else:
            unknown.append(f"{key}{_suggest(name, [*flat, *sections, *known])}")
    if unknown:
        problems.insert(
            0,
            f"unknown setting(s) {', '.join(unknown)} in {where}; keys are the flags' names "
            f"(max_steps for --max-steps) or sit in the sections {', '.join(s + ':' for s in sections)}",
        )
    if problems:
        raise ConfigError("; ".join(problems) if unknown else f"{where}: {'; '.join(problems)}")
    return values


def _scalar(value: Any, kind: Any, name: str) -> Any:
    """``value`` from YAML as ``kind`` (int, float, str): numbers stay numbers, text is parsed as a flag is."""
    if isinstance(value, bool | list | dict):
        raise ValueError(f"{name} must be {'a number' if kind in (int, float) else 'text'} (got {value!r})")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be a whole number (got {value})")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number (got {value!r})") from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number (got {value!r})") from None
    return str(value)


def _convert(action: argparse.Action, value: Any, name: str) -> Any:
    """A config file's value for one flag, checked as the flag would check it (ValueError: why not)."""
    annotation = getattr(action, "annotation", None)
    if value is None:
        if annotation is not None and None not in type_members(annotation):
            raise ValueError(f"{name} cannot be empty; give a value or leave the key out")
        return None
    if action.nargs == 0:  # a switch: --x / --no-x, or store_true
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false (got {value!r})")
        return value
    members = type_members(annotation) if annotation is not None else []
    if isinstance(value, dict) and any(typing.get_origin(m) is dict for m in members):
        return {str(k): str(v) for k, v in value.items()}  # prompting's verbalizers: {label: words}
    listed = next((m for m in members if typing.get_origin(m) is list), None)
    if listed is not None or (annotation is None and action.type not in (None, str, int, float)):
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif not isinstance(value, str):
            raise ValueError(f"{name} must be a list (got {value!r})")
        convert = action.type
        assert callable(convert)  # a list's parser (_flag_type) or a flag's own converter, never None here
        try:
            converted = convert(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"{name}: {error}") from None
    else:
        kind = next((m for m in members if m is not None), None) if annotation is not None else action.type
        converted = _scalar(value, kind if kind in (int, float) else str, name)
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, action.choices))} (got {converted!r})")
    return converted


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}"
        )
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
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({error.reason}); save it as UTF-8"
        ) from error
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold {expected}")
    return raw


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed flags (defaults < ``--config`` file < flags when parsed by :func:`parse_args`)."""
    run: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"data": {}, "train": {}}
    method_values: dict[str, dict[str, Any]] = {name: {} for name in METHODS}
    top = {f.name for f in setting_fields(RunConfig)}
    for key, value in vars(args).items():
        if value is None or key == "config" or key.startswith("_"):
            continue
        section, _, name = key.rpartition(".")
        if section.startswith("methods."):
            method_values[section.split(".", 1)[1]][name] = value
        elif section in sections:
            sections[section][name] = value
        elif key in top:
            run[key] = value
    config = _build(RunConfig, run, "the settings")
    config.data = _build(DataConfig, sections["data"], "the data settings")
    config.train = _build(TrainConfig, sections["train"], "the training settings")
    config.methods = {n: METHODS[n].config_class(**v) for n, v in method_values.items()}
    validate(config)
    return config


def run_config_values(config: RunConfig) -> dict[str, Any]:
    """A RunConfig's settings by flag destination (``train.max_steps``, ``methods.lora.rank``); only the
    chosen method's settings."""
    values: dict[str, Any] = settings_dict(config)
    values.update({f"data.{k}": v for k, v in settings_dict(config.data).items()})
    values.update({f"train.{k}": v for k, v in settings_dict(config.train).items()})
    values.update(
        {f"methods.{config.method}.{k}": v for k, v in settings_dict(config.method_config()).items()}
    )
    return values


def command_yaml(args: argparse.Namespace, values: dict[str, Any] | None = None) -> str:
    """A parsed command's settings as YAML in the nested layout its ``--config`` reads back: each flag under
    its destination (``data.max_examples`` -> ``data: {max_examples: ...}``, ``methods.lora.rank`` ->
    ``lora: {rank: ...}``), valued from ``values`` (resolved settings by destination) where given. Unset
    (None) settings are left out: reading the file back gives them their defaults again."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith("_") or dest in _NOT_SETTINGS or callable(value):
            continue
        value = (values or {}).get(dest, value)
        if value is None:
            continue
        parts = dest.split(".")
        parts = parts[1:] if parts[0] == "methods" else parts
        if len(parts) == 1:
            out[dest] = value
        else:
            out.setdefault(parts[0], {})[parts[-1]] = value
    return yaml.safe_dump(out, sort_keys=False)
