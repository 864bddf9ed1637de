"""Typed configs as flags, config files and help text: every command, parsed without loading a model."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from multitune.cli import build_parser
from multitune.compare.cli import compare_config
from multitune.config import task_name_from_folder
from multitune.errors import ConfigError
from multitune.flags import load_run_config, parse_args, show_default

COMMANDS_WITH_CONFIG = ["train", "compare", "reward", "dpo", "ppo", "ensemble"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _write(tmp_path, data, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def _error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_args(build_parser(), argv)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- booleans: a flag and its negation ----------------------------------------------------------------
BOOL_FLAGS = {
    "train": ["drop-empty", "lora-rslora", "prefix-projection", "adapter-train-layer-norms"],
    "compare": ["drop-empty", "lora-rslora", "search-only"],
    "reward": ["drop-empty", "lora-rslora"],
    "dpo": ["drop-empty", "prefix-projection"],
    "ppo": ["whiten-advantages", "lora-rslora", "reward-include-prompt"],
    "eval": ["drop-empty"],
    "ensemble": ["drop-empty"],
}
DESTS = {
    "drop-empty": "data.drop_empty",
    "lora-rslora": "methods.lora.rslora",
    "prefix-projection": "methods.prefix.projection",
    "adapter-train-layer-norms": "methods.adapter.train_layer_norms",
    "whiten-advantages": "ppo.whiten_advantages",
    "search-only": "search_only",
    "reward-include-prompt": "reward_include_prompt",
}
REQUIRED = {"eval": ["RUN"], "train": [], "compare": [], "reward": [], "dpo": [], "ppo": [], "ensemble": []}


@pytest.mark.parametrize(("command", "flag"), [(c, f) for c, flags in BOOL_FLAGS.items() for f in flags])
def test_every_boolean_is_a_bare_flag_with_a_negation(command, flag) -> None:
    dest = "drop_empty" if command == "eval" else DESTS[flag]
    parser = build_parser()
    on = vars(parse_args(parser, [command, *REQUIRED[command], f"--{flag}"]))
    off = vars(parse_args(build_parser(), [command, *REQUIRED[command], f"--no-{flag}"]))
    assert on[dest] is True and off[dest] is False


def test_no_setting_takes_true_or_false_as_a_value() -> None:
    """A bool setting anywhere is a switch (nargs=0): `--x true` is never how a boolean is given."""
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if getattr(action, "annotation", None) is bool:
                assert action.nargs == 0 and any(o.startswith("--no-") for o in action.option_strings), (
                    name,
                    action,
                )


def test_an_absent_bool_flag_leaves_the_file_and_the_default_alone(tmp_path) -> None:
    config = _write(tmp_path, {"lora_rslora": True, "data": {"drop_empty": True}})
    args = parse_args(build_parser(), ["train", "--config", config, "--no-drop-empty"])
    run = load_run_config(args)
    assert run.methods["lora"].rslora is True and run.data.drop_empty is False
    assert load_run_config(parse_args(build_parser(), ["train"])).data.drop_empty is False


# ---- config files: flat keys named as the flags, or the nested layout --------------------------------------
def test_flat_keys_named_as_the_flags(tmp_path) -> None:
    config = _write(
        tmp_path,
        {
            "data": "my.csv",
            "max_steps": 3,
            "text_column": "review",
            "lora_rank": 4,
            "drop_empty": True,
            "split": [0.7, 0.2, 0.1],
            "lora-alpha": 8,
            "method": "lora",
        },
    )
    run = load_run_config(parse_args(build_parser(), ["train", "--config", config]))
    assert run.data.data == "my.csv" and run.train.max_steps == 3 and run.data.text_column == "review"
    assert run.methods["lora"].rank == 4 and run.methods["lora"].alpha == 8.0
    assert run.data.drop_empty is True and run.data.split == [0.7, 0.2, 0.1]


def test_nested_sections_and_flags_over_the_file(tmp_path) -> None:
    config = _write(
        tmp_path,
        {
            "data": {"data": "my.csv", "label_column": "stars"},
            "train": {"epochs": 2},
            "lora": {"rank": 2},
            "split": "0.6,0.2,0.2",
        },
    )
    run = load_run_config(
        parse_args(build_parser(), ["train", "--config", config, "--lora-rank", "5", "--epochs", "1"])
    )
    assert (
        run.data.data == "my.csv" and run.data.label_column == "stars" and run.data.split == [0.6, 0.2, 0.2]
    )
    assert run.train.epochs == 1 and run.methods["lora"].rank == 5


def test_a_written_config_yaml_reads_back_for_every_method(tmp_path) -> None:
    from multitune.config import to_yaml
    from multitune.methods import METHODS

    for method in sorted(METHODS):
        args = parse_args(
            build_parser(), ["train", "--method", method, "--data", "d.csv", "--output", "runs/x"]
        )
        first = load_run_config(args)
        config = _write(tmp_path, to_yaml(first), f"{method}.yaml")
        again = load_run_config(parse_args(build_parser(), ["train", "--config", config]))
        assert to_yaml(again) == to_yaml(first), method


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"lora_rnak": 4}, "lora_rnak (did you mean lora_rank?)"),
        ({"train": {"epoch": 3}}, "epoch in train: (did you mean epochs?)"),
        ({"max_step": 3}, "did you mean max_steps?"),
        ({"max_steps": "many"}, "max_steps must be a whole number (got 'many')"),
        ({"max_steps": 2.5}, "must be a whole number"),
        ({"drop_empty": "maybe"}, "drop_empty must be true or false"),
        ({"epochs": None}, "epochs cannot be empty"),
        ({"train": 3}, "'train:' must be a section of settings"),
        ({"max_steps": 3, "train": {"max_steps": 4}}, "given twice"),
        ({"lora": {"rank": [1, 2]}}, "lora.rank must be a number"),
        ("- a\n- b\n", "must hold a mapping"),
        ("train: [unclosed", "not valid YAML"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, data, expected) -> None:
    assert expected in _error(["train", "--config", _write(tmp_path, data)])


def test_a_missing_config_file(tmp_path) -> None:
    assert "not found" in _error(["train", "--config", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG)
def test_every_command_with_config_takes_its_flags_flat_and_nested(command, tmp_path) -> None:
    method, setting, dest = (
        ("prompt", "num_virtual_tokens", "methods.prompt.num_virtual_tokens")
        if command == "ensemble"
        else ("lora", "rank", "methods.lora.rank")
    )
    section = "ppo" if command == "ppo" else "train"
    flat = {"max_length": 17, f"{method}_{setting}": 3, "seed": 5}
    nested = {section: {"max_length": 17, "seed": 5}, method: {setting: 3}}
    if command == "ppo":
        flat["prompts"] = nested["prompts"] = "p.jsonl"
    for data in (flat, nested):
        values = vars(parse_args(build_parser(), [command, "--config", _write(tmp_path, data)]))
        assert values[dest] == 3 and values[f"{section}.max_length"] == 17 and values[f"{section}.seed"] == 5
        if command == "ppo":
            assert values["prompts"] == "p.jsonl"
    bad = _write(tmp_path, {f"{method}_{setting[:-1]}": 3}, "bad.yaml")
    assert f"did you mean {method}_{setting}?" in _error([command, "--config", bad])


def test_compare_reads_its_own_flags_from_the_file(tmp_path) -> None:
    config = _write(
        tmp_path,
        {
            "methods": ["lora", "ia3"],
            "trials": 2,
            "data": "d.csv",
            "epochs": 2,
            "lora": {"rank": 4},
            "kind": "classification",
        },
    )
    settings = compare_config(parse_args(build_parser(), ["compare", "--config", config, "--trials", "3"]))
    assert settings.methods == ["lora", "ia3"] and settings.trials == 3 and settings.data.data == "d.csv"
    assert settings.train.epochs == 2 and settings.method_settings["lora"].rank == 4
    assert "must be one of classification, generation" in _error(
        ["compare", "--config", _write(tmp_path, {"kind": "regression"}, "k.yaml")]
    )


def test_preference_commands_offer_only_the_methods_they_can_train(tmp_path) -> None:
    subs = _subparsers()
    for command in ("reward", "dpo", "ppo"):
        flags = {o for a in subs[command]._actions for o in a.option_strings}
        assert "--lora-rank" in flags and not any(f.startswith("--prompting-") for f in flags), command
    # a prompting section in a file is reported as a setting the command does not have
    config = _write(tmp_path, {"prompting": {"shots": 2}})
    assert "unknown setting(s) prompting: (the settings of a method this command does not offer)" in _error(
        ["dpo", "--config", config]
    )


# ---- defaults shown as typed; help text -----------------------------------------------------------------------
def test_defaults_are_shown_as_a_user_types_them() -> None:
    assert show_default([0.8, 0.1, 0.1]) == "0.8,0.1,0.1"
    assert show_default("\n\n") == "'\\n\\n'" and show_default("") == "''" and show_default(" x") == "' x'"
    assert show_default(None) is None and show_default(False) == "off" and show_default("auto") == "auto"


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_help_text_is_clean(command, capsys) -> None:
    sub = _subparsers()[command]
    for action in sub._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help and action.help.strip(), (command, action.option_strings)
            assert action.help.count("(default:") <= 1 and "default: None" not in action.help, action.help
    text = " ".join(_help(command, capsys).split())
    assert not re.search(r"\(default: [^)]*\) \(default:", text), command
    for bad in ("(default: None)", "ShotPool(", "[0.8", "(default: )", "%"):
        assert bad not in text, (command, bad)


def test_one_wording_for_the_device_and_the_reference(capsys) -> None:
    from multitune.config import DEVICE_HELP

    subs = _subparsers()
    for command in ("train", "eval", "predict", "ppo", "reward", "dpo", "compare", "ensemble"):
        device = next(a for a in subs[command]._actions if "--device" in a.option_strings)
        assert device.help.startswith(DEVICE_HELP), command
    helps = {c: " ".join(_help(c, capsys).split()) for c in ("dpo", "ppo")}
    for text in helps.values():
        assert (
            "disabled: the base with every adapter off" in text and "initial: the policy as it starts" in text
        )
        assert "'copy' is accepted for initial" in text
    assert vars(parse_args(build_parser(), ["dpo", "--reference", "copy"]))["reference"] == "copy"


def test_methods_lists_settings_not_internal_state(capsys) -> None:
    from multitune.cli import main

    assert main(["methods", "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "--prompting-pool " not in out and "ShotPool" not in out and "(default: None)" not in out
    assert "--prompting-shot-separator" in out and "(default: '\\n\\n')" in out
    assert "--lora-rslora / --no-lora-rslora" in out
    assert "base: the frozen base, no adapter" in out


# ---- task names -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("runs/bank/subj", "subj"),
        ("runs/My Run.v2", "My-Run-v2"),
        ("runs/_x_", "x_"),
        ("runs/" + "a" * 80, "a" * 64),
        ("runs/...", "task"),
        ("runs/élan", "lan"),
    ],
)
def test_task_name_from_the_output_folder(folder, name) -> None:
    from multitune.config import TASK_NAME

    assert task_name_from_folder(folder) == name and TASK_NAME.fullmatch(name)


def test_train_names_the_task_after_the_output_folder(tmp_path) -> None:
    assert load_run_config(parse_args(build_parser(), ["train", "--output", "runs/bank/subj"])).task == "subj"
    assert (
        load_run_config(parse_args(build_parser(), ["train", "--output", "x", "--task", "mine"])).task
        == "mine"
    )
    assert load_run_config(parse_args(build_parser(), ["train"])).task == "run"
    assert "task name 'a b' must be letters" in str(
        pytest.raises(
            ConfigError, load_run_config, parse_args(build_parser(), ["train", "--task", "a b"])
        ).value
    )


def test_every_method_setting_has_help_text() -> None:
    """Help text is what makes a field a setting (a flag): a new field without it would vanish silently."""
    import dataclasses

    from multitune.config import DataConfig, RunConfig, TrainConfig, setting_fields
    from multitune.methods import METHODS

    for cls in [DataConfig, TrainConfig, *(m.config_class for m in METHODS.values())]:
        internal = {f.name for f in dataclasses.fields(cls)} - {f.name for f in setting_fields(cls)}
        assert internal <= {"pool"}, (cls.__name__, internal)  # prompting's pool: written by fit, not a flag
    assert {f.name for f in setting_fields(RunConfig)} == {
        "model",
        "task",
        "kind",
        "domain_objective",
        "stack_on",
        "method",
        "output",
    }


def test_an_empty_section_sets_nothing_and_a_dict_setting_stays_a_dict(tmp_path) -> None:
    config = _write(tmp_path, "lora:\nprompting:\n  verbalizers: {pos: great, neg: awful}\n")
    run = load_run_config(parse_args(build_parser(), ["train", "--config", config]))
    assert run.methods["lora"].rank == 8 and run.methods["prompting"].verbalizers == {
        "pos": "great",
        "neg": "awful",
    }
