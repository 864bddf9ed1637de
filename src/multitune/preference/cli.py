"""``multitune reward``, ``multitune dpo`` and ``multitune ppo``: flags, run folders (locked, resumable), summaries."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel
from multitune.cli_commands import Command
from multitune.config import TrainConfig, plural
from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.preference.dpo import (
    REFERENCE_ALIASES,
    REFERENCE_HELP,
    REFERENCES,
    check_dpo_policy,
    reference_name,
    train_dpo,
)
from multitune.preference.pairs import Pair, load_pairs, split_pairs
from multitune.preference.ppo import VALUE_HEAD_FILE, PPOConfig, check_policy, save_value_head, train_ppo
from multitune.preference.reward import train_reward
from multitune.preference.rewards import load_python_reward, reward_from_classifier, reward_from_model
from multitune.preference.scoring import REWARD_LABELS, add_reward_task, check_trainable, trainable_methods

# ---- CLI ----------------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"


def _add_common_arguments(parser: argparse.ArgumentParser, output: str, methods: list[str]) -> None:
    from multitune.config import add_arguments, add_config_argument, add_method_arguments

    add_config_argument(parser)
    parser.add_argument(
        "--data",
        dest="data.data",
        metavar="FILE",
        help="preference pairs (.jsonl .json .csv .parquet): prompt/chosen/rejected columns, or HH "
        "chosen/rejected dialogues split at the last '\\n\\nAssistant:'",
    )
    parser.add_argument(
        "--validation-data",
        dest="data.validation_data",
        metavar="FILE",
        help="held-out pairs for early stopping and the reported accuracy "
        "(default: --validation-ratio of --data)",
    )
    parser.add_argument(
        "--validation-ratio",
        type=float,
        default=0.1,
        help="fraction of --data held out when no --validation-data is given (default: 0.1)",
    )
    parser.add_argument(
        "--split-seed",
        dest="data.split_seed",
        type=int,
        metavar="N",
        help="seed of the held-out split (default: 0)",
    )
    parser.add_argument(
        "--max-pairs",
        dest="data.max_examples",
        type=int,
        metavar="N",
        help="train on at most N pairs (after the held-out split)",
    )
    parser.add_argument(
        "--drop-empty",
        dest="data.drop_empty",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop pairs with an empty chosen or rejected response (default: off)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model: short name, HF folder or .gguf (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--method", default="lora", help="adaptation method: " + ", ".join(methods) + " (default: lora)"
    )
    parser.add_argument(
        "--task", help="task name: letters, digits, _ and - (default: the --output folder's name)"
    )
    parser.add_argument(
        "--output",
        default=output,
        help=f"folder to write: config.yaml, metrics.jsonl, adapter/, result.json (default: {output})",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --output from its checkpoint"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(parser, TrainConfig, dest_prefix="train.")
    add_method_arguments(parser, [m for m in methods if m in METHODS])


def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``multitune reward``: the data, the base and method (as ``multitune train``), training."""
    _add_common_arguments(parser, "runs/reward", ["base", *trainable_methods()])


def add_dpo_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``multitune dpo``: those of ``reward``, plus beta, the reference and a starting adapter."""
    _add_common_arguments(parser, "runs/dpo", trainable_methods())
    parser.add_argument(
        "--beta",
        type=float,
        default=0.1,
        help="DPO's beta: how far the policy may move from the reference (default: 0.1)",
    )
    parser.add_argument(
        "--reference",
        choices=[*REFERENCES, *REFERENCE_ALIASES],
        default="disabled",
        help=f"{REFERENCE_HELP} (default: disabled)",
    )
    parser.add_argument(
        "--init-adapter",
        metavar="DIR",
        help="start from this trained generation adapter (e.g. an SFT run's RUN/adapter) "
        "instead of a fresh task",
    )


def _run_config(args: argparse.Namespace) -> Any:
    """The flags (defaults < --config file < flags) as a RunConfig, validated as ``multitune train``'s are."""
    from multitune.config import load_run_config

    config = load_run_config(args)
    if not 0 < args.validation_ratio < 1:
        raise ConfigError(f"--validation-ratio must be between 0 and 1 (got {args.validation_ratio})")
    if not config.data.data:
        raise ConfigError(
            "no preference data given; pass --data FILE (.jsonl .json .csv .parquet with "
            "prompt/chosen/rejected or HH chosen/rejected)"
        )
    return config


@contextlib.contextmanager
def run_folder(output: str | Path, command: str, resume: bool = False) -> Any:
    """Hold the output folder for the block (one command at a time); refuse one that is not this command's.

    Yields ``start(settings)``, to call once the data, the model and the task are ready: it writes config.yaml
    (the training loop writes metrics.jsonl and the checkpoint). With ``resume``, an interrupted run of the same
    command in the folder continues from its checkpoint; without it, only an empty folder is taken. A run
    refused before ``start`` leaves nothing.
    """
    from multitune.storage import output_lock

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; choose another --output")
    with output_lock(out, command):
        ours = _is_run_of(out, command)
        if resume and any(out.iterdir()) and not ours:
            raise ConfigError(
                f"--resume continues a run of '{command}', and {out} holds none; choose another --output"
            )
        if not resume and any(out.iterdir()):
            hint = "pass --resume to continue it, or" if ours else ""
            raise ConfigError(
                f"output folder {out} already exists; {hint} choose another --output or remove it"
            )

        def start(settings: str) -> Callable[[dict[str, Any]], None]:
            """Write config.yaml; returns ``append(record)``, which adds a line to metrics.jsonl (PPO's steps;
            the training loop of reward and DPO writes its own lines there)."""
            import json

            (out / "config.yaml").write_text(_RUN_MARK.format(command=command) + settings)
            metrics = out / "metrics.jsonl"
            if not metrics.exists():
                metrics.write_text("")

            def append(record: dict[str, Any]) -> None:
                with open(metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")

            return append

        yield start


_RUN_MARK = "# {command} run folder: the settings of this run (--config reads them back)\n"


def _is_run_of(folder: Path, command: str) -> bool:
    try:
        return (folder / "config.yaml").read_text().startswith(_RUN_MARK.format(command=command))
    except OSError:
        return False


def _finished(folder: Path) -> dict[str, Any] | None:
    """The result of a run that already finished in ``folder`` (resuming it changes nothing)."""
    import json

    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _load_splits(config: Any, ratio: float) -> tuple[list[Pair], list[Pair]]:
    data = config.data
    pairs = load_pairs(data.data, drop_empty=bool(data.drop_empty))
    if data.validation_data:
        train, held = pairs, load_pairs(data.validation_data, drop_empty=bool(data.drop_empty))
    else:
        train, held = split_pairs(pairs, ratio, data.split_seed)
    if data.max_examples is not None:
        if data.max_examples < 1:
            raise ConfigError(f"--max-pairs must be >= 1 (got {data.max_examples})")
        train = train[: data.max_examples]
    return train, held


def _load_bank(config: Any) -> MultiTaskModel:
    from multitune.models import load_base

    device = None if config.train.device == "auto" else config.train.device
    torch.manual_seed(config.train.seed)
    return MultiTaskModel(load_base(config.model, device=device))


def _settings(config: Any) -> dict[str, Any]:
    return {
        "train": dataclasses.asdict(config.train),
        config.method: dataclasses.asdict(config.method_config()),
    }


def _settings_yaml(args: argparse.Namespace, config: Any) -> str:
    """config.yaml: this command's settings as resolved, in the layout its ``--config`` reads back."""
    from multitune.config import command_yaml, run_config_values

    return command_yaml(args, run_config_values(config))


def _save(
    bank: MultiTaskModel,
    task: str,
    out: Path,
    summary: dict[str, Any],
    keep_checkpoint: bool,
    extra: dict[str, Any],
) -> None:
    """The adapter (an atomic folder swap), then result.json: a run with a result.json is complete; its
    checkpoint goes unless ``keep_checkpoint``."""
    import shutil

    from multitune.storage import save_adapter, write_json_atomic
    from multitune.training.loop import CHECKPOINT

    save_adapter(bank, task, out / "adapter", extra=extra)
    write_json_atomic(out / "result.json", summary)
    if not keep_checkpoint:
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_kept(result: dict[str, Any]) -> None:
    """Say so when early stopping kept weights other than the last ones (the start, possibly)."""
    last = result["evals"][-1] if result["evals"] else None
    if last is None or result["best_step"] == result["steps"]:
        return
    where = (
        "its starting weights" if result["best_step"] == 0 else f"the weights of step {result['best_step']}"
    )
    print(
        f"kept {where}: the held-out pairs scored best there (the last evaluation, step {last['step']}: "
        f"accuracy {_fmt(last['accuracy'])}, margin {_fmt(last['margin'])})"
    )


def cmd_reward(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune reward``: train a reward model on preference pairs; write config.yaml, metrics.jsonl,
    DIR/adapter and DIR/result.json."""
    config = _run_config(args)
    check_trainable(config.method, head=True)
    with run_folder(config.output, "multitune reward", args.resume) as start:
        done = _finished(Path(config.output)) if args.resume else None
        if done is not None:
            print(
                f"reward model '{done['task']}' finished in an earlier run; adapter: {Path(config.output) / 'adapter'}"
            )
            return done
        train, held = _load_splits(config, args.validation_ratio)  # the user's files first: they fail fast
        bank = _load_bank(config)
        add_reward_task(bank, config.task, config.method, config.method_config())
        trainable = sum(p.numel() for p in bank.task_parameters(config.task).values())
        start(_settings_yaml(args, config))
        result = train_reward(
            bank,
            config.task,
            train,
            held,
            config.train,
            progress=not args.quiet,
            run_dir=config.output,
            resume=args.resume,
        )
        before, after = result["before"] or {}, result["after"] or {}
        summary = {
            "command": "reward",
            "task": config.task,
            "method": config.method,
            "model": config.model,
            "pairs": {"train": len(train), "validation": len(held)},
            "trainable_parameters": trainable,
            "steps": result["steps"],
            "best_step": result["best_step"],
            "stopped_early": result["stopped_early"],
            "seconds": result["seconds"],
            "learning_rate": result["learning_rate"],
            "validation_pair_accuracy": result["validation_accuracy"],
            "validation_margin": after.get("margin"),
            "validation_loss": after.get("loss"),
            "before": before,
            "evals": result["evals"],
            "score": "logit[chosen] - logit[rejected]",
            "settings": _settings(config),
        }
        out = Path(config.output)
        _save(
            bank,
            config.task,
            out,
            summary,
            config.train.keep_checkpoint,
            {
                "reward_model": {"labels": REWARD_LABELS, "score": summary["score"]},
                "metrics": {"validation_pair_accuracy": result["validation_accuracy"]},
            },
        )
    print(
        f"trained reward model '{config.task}' ({config.method}) on {config.model}: {trainable:,} trainable "
        f"parameters, {plural(len(train), 'pair')}, {plural(result['steps'], 'step')}, {result['seconds']:.1f} s"
    )
    print(
        f"held-out pair accuracy: {_fmt(result['validation_accuracy'])} (before training "
        f"{_fmt(before.get('accuracy'))}) on {plural(len(held), 'pair')}"
    )
    _print_kept(result)
    print(f"adapter: {out / 'adapter'}")
    return summary


def cmd_dpo(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune dpo``: DPO on preference pairs; write config.yaml, metrics.jsonl, DIR/adapter and
    DIR/result.json."""
    if not args.beta > 0:
        raise ConfigError(f"--beta must be > 0 (got {args.beta}); 0.1 is usual")
    reference = reference_name(args.reference)
    config = _run_config(args)
    if not args.init_adapter:
        check_trainable(config.method)
    with run_folder(config.output, "multitune dpo", args.resume) as start:
        done = _finished(Path(config.output)) if args.resume else None
        if done is not None:
            print(
                f"policy '{done['task']}' finished in an earlier run; adapter: {Path(config.output) / 'adapter'}"
            )
            return done
        train, held = _load_splits(config, args.validation_ratio)
        bank = _load_bank(config)
        if args.init_adapter:
            from multitune.api import adapter_folder
            from multitune.storage import load_adapter

            spec = load_adapter(bank, adapter_folder(args.init_adapter), config.task)
            if spec.kind != "generation":
                raise ConfigError(
                    f"{args.init_adapter} holds a {spec.kind} task; DPO starts from a generation adapter"
                )
        else:
            bank.add_task(config.task, "generation", config.method, config.method_config())
        method = bank.tasks[config.task].method
        trainable = sum(p.numel() for p in bank.task_parameters(config.task).values())
        check_dpo_policy(bank, config.task)
        start(_settings_yaml(args, config))
        result = train_dpo(
            bank,
            config.task,
            train,
            held,
            config.train,
            beta=args.beta,
            progress=not args.quiet,
            reference=reference,
            run_dir=config.output,
            resume=args.resume,
        )
        before, after = result["before"] or {}, result["after"] or {}
        summary = {
            "command": "dpo",
            "task": config.task,
            "method": method,
            "model": config.model,
            "beta": args.beta,
            "reference": reference,
            "init_adapter": args.init_adapter,
            "pairs": {"train": len(train), "validation": len(held)},
            "trainable_parameters": trainable,
            "steps": result["steps"],
            "best_step": result["best_step"],
            "stopped_early": result["stopped_early"],
            "seconds": result["seconds"],
            "learning_rate": result["learning_rate"],
            "preference_accuracy": {"before": before.get("accuracy"), "after": after.get("accuracy")},
            "margin": {"before": before.get("margin"), "after": after.get("margin")},
            "reference_likelihood_accuracy": result["reference_likelihood_accuracy"],
            "validation_loss": {"before": before.get("loss"), "after": after.get("loss")},
            "evals": result["evals"],
            "settings": _settings(config),
        }
        out = Path(config.output)
        _save(
            bank,
            config.task,
            out,
            summary,
            config.train.keep_checkpoint,
            {
                "dpo": {"beta": args.beta, "reference": reference},
                "metrics": {"preference_accuracy": summary["preference_accuracy"]},
            },
        )
    print(
        f"trained '{config.task}' ({method}) with DPO (beta {args.beta}) on {config.model}: {trainable:,} "
        f"trainable parameters, {plural(len(train), 'pair')}, {plural(result['steps'], 'step')}, "
        f"{result['seconds']:.1f} s"
    )
    print(
        f"held-out preference accuracy: {_fmt(before.get('accuracy'))} -> {_fmt(after.get('accuracy'))}, "
        f"mean margin {_fmt(before.get('margin'))} -> {_fmt(after.get('margin'))} on {plural(len(held), 'pair')}"
    )
    _print_kept(result)
    print(f"adapter: {out / 'adapter'}")
    return summary


# ---- CLI -------------------------------------------------------------------------------------------
def add_ppo_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``multitune ppo``: model, prompts, one reward source, method, PPO settings, output."""
    from multitune.config import DEVICE_HELP, add_arguments, add_config_argument, add_method_arguments

    add_config_argument(parser)
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="base model: short name, HF folder or .gguf (default: smollm2-135m)",
    )
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file (.jsonl/.json/.csv with a prompt column, "
        "or preference pairs whose prompt is split off; required)",
    )
    parser.add_argument(
        "--reward-model", help="adapter folder of a trained reward model (multitune preference)"
    )
    parser.add_argument("--reward-classifier", help="adapter or run folder of a trained classification task")
    parser.add_argument(
        "--reward-label", help="with --reward-classifier: the label whose probability is the reward"
    )
    parser.add_argument(
        "--reward-include-prompt",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --reward-classifier: classify prompt and response as a pair, not the response "
        "alone (default: off)",
    )
    parser.add_argument(
        "--reward-python",
        help="a Python reward function MODULE:FUNCTION (or path/file.py:FUNCTION) "
        "taking (prompts, responses) and returning one number per response",
    )
    parser.add_argument(
        "--task",
        help="name of the policy task: letters, digits, _ and - (default: the --output folder's name)",
    )
    parser.add_argument(
        "--method",
        default="lora",
        help="adaptation method of the policy: " + ", ".join(trainable_methods()) + " (default: lora)",
    )
    parser.add_argument("--max-prompts", type=int, metavar="N", help="use at most the first N prompts")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument(
        "--output",
        default="runs/ppo",
        help="folder to write: config.yaml, metrics.jsonl (one line "
        "per step), adapter/, value_head.safetensors, result.json (default: runs/ppo)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (step lines are still printed)")
    add_arguments(parser, PPOConfig, dest_prefix="ppo.")
    add_method_arguments(parser, trainable_methods())


def ppo_config_from_args(args: argparse.Namespace) -> tuple[PPOConfig, Any]:
    """(PPOConfig, the method's config) from the flags that were given."""
    values = vars(args)
    ppo = {k[4:]: v for k, v in values.items() if k.startswith("ppo.") and v is not None}
    config = dataclasses.replace(PPOConfig(), **ppo)
    if args.method not in METHODS:
        raise ConfigError(f"unknown method '{args.method}'; choose one of: {', '.join(sorted(METHODS))}")
    prefix = f"methods.{args.method}."
    method_values = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix) and v is not None}
    method_config = METHODS[args.method].config_class(**method_values)
    problems = config.validate() + method_config.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    return config, method_config


def _load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file, read as multitune.preference reads them (a prompt column, pairs, or .txt lines)."""
    from multitune.preference.pairs import load_prompts

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {path} not found; pass --prompts FILE")
    return list(load_prompts(path))


def _reward_source(args: argparse.Namespace) -> str:
    given = [
        flag
        for flag, value in (
            ("--reward-model", args.reward_model),
            ("--reward-classifier", args.reward_classifier),
            ("--reward-python", args.reward_python),
        )
        if value
    ]
    if not given:
        raise ConfigError(
            "no reward given; pass one of --reward-model DIR, --reward-classifier DIR --reward-label L, "
            "--reward-python MODULE:FUNCTION"
        )
    if len(given) > 1:
        raise ConfigError(f"several rewards given ({', '.join(given)}); pass exactly one")
    if args.reward_classifier and not args.reward_label:
        raise ConfigError(
            "--reward-classifier needs --reward-label L (the label whose probability is the reward)"
        )
    if args.reward_label and not args.reward_classifier:
        raise ConfigError("--reward-label only applies with --reward-classifier DIR")
    return given[0]


def _judge_bank(
    policy: MultiTaskModel, policy_task: str, folder: Path, model: str, device: str | None
) -> tuple[MultiTaskModel, str]:
    """Load a reward task: onto the policy's bank when it was trained on the same base (no second copy of
    the model), else onto its own base (another base, or a fully fine-tuned policy that changes this one)."""
    from multitune.models import load_base
    from multitune.storage import load_adapter, read_adapter_config

    meta = read_adapter_config(folder)
    same = meta.get("base_model") == model and not get_method(policy.tasks[policy_task].method).changes_base
    bank = policy if same else MultiTaskModel(load_base(meta["base_model"], device=device))
    name = "reward" if "reward" not in bank.tasks else "reward-judge"
    load_adapter(bank, folder, name)
    return bank, name


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_ppo(args: argparse.Namespace) -> None:
    """``multitune ppo``: load the base, add the policy task, build the reward, run PPO, save everything.

    The run folder is written as ``multitune train`` writes one: config.yaml (the settings, which
    ``--config`` reads back) and metrics.jsonl (a line per step, as it happens) first, then adapter/, the
    value head and, last, result.json.
    """
    from multitune.api import adapter_folder
    from multitune.config import TASK_NAME, command_yaml, device_problem, task_name_from_folder
    from multitune.models import load_base
    from multitune.storage import publish_mode, save_adapter, write_json_atomic

    config, method_config = ppo_config_from_args(args)
    task = args.task or task_name_from_folder(args.output)
    if not TASK_NAME.fullmatch(task):
        raise ConfigError(
            f"task name '{task}' must be letters, digits, _ and - (at most 64, starting with a letter "
            "or digit); fix --task"
        )
    if device_problem(args.device):
        raise ConfigError(device_problem(args.device))
    source = _reward_source(args)
    if not args.prompts:
        raise ConfigError(
            "no prompts given; pass --prompts FILE (.jsonl/.json/.csv with a prompt column, or .txt)"
        )
    prompts = _load_prompts(args.prompts)
    if args.max_prompts is not None:
        if args.max_prompts < 1:
            raise ConfigError(f"--max-prompts must be >= 1 (got {args.max_prompts})")
        prompts = prompts[: args.max_prompts]
    if not prompts:
        raise ConfigError(f"{args.prompts} holds no prompts; give a file with at least one")
    reward_python = load_python_reward(args.reward_python) if args.reward_python else None
    judge_folder = (
        adapter_folder(args.reward_model or args.reward_classifier) if source != "--reward-python" else None
    )
    resolved = {
        "task": task,
        **{f"ppo.{k}": v for k, v in asdict(config).items()},
        **{f"methods.{args.method}.{k}": v for k, v in asdict(method_config).items()},
    }
    out = Path(args.output)
    with run_folder(out, "multitune ppo") as start:
        device = None if args.device == "auto" else args.device
        base = load_base(args.model, device=device)
        torch.manual_seed(config.seed)
        bank = MultiTaskModel(base)
        bank.add_task(task, "generation", args.method, method_config)
        check_policy(bank, task, config)
        if judge_folder is not None:
            judge, judge_task = _judge_bank(bank, task, judge_folder, args.model, device)
            if source == "--reward-model":
                reward_fn = reward_from_model(judge, judge_task, max_length=config.max_length)
            else:
                reward_fn = reward_from_classifier(
                    judge,
                    judge_task,
                    args.reward_label,
                    args.reward_include_prompt,
                    max_length=config.max_length,
                )
        else:
            assert reward_python is not None  # _reward_source guarantees exactly one source
            reward_fn = reward_python
        trainable = sum(p.numel() for p in bank.task_parameters(task).values())
        write_metrics = start(command_yaml(args, resolved))
        reward_text = args.reward_model or args.reward_classifier or args.reward_python
        print(
            f"ppo: {args.method} policy '{task}' on {args.model} ({trainable:,} trainable + value head), "
            f"{plural(len(prompts), 'prompt')}, reward {source} {reward_text}, "
            f"reference: {config.reference}",
            flush=True,
        )

        def log(record: dict[str, Any]) -> None:
            write_metrics(record)
            tqdm.write(
                f"step {record['step']:>4}/{config.steps}  score {record['score']:8.4f}  reward "
                f"{record['reward']:8.4f}  kl {record['kl']:7.4f}  kl_coef {record['kl_coef']:.4f}  "
                f"entropy {record['entropy']:.3f}  clip {record['clip_fraction']:.3f}",
                file=sys.stdout,
            )
            sys.stdout.flush()

        result = train_ppo(bank, task, prompts, reward_fn, config, progress=not args.quiet, log=log)
        history = result["history"]
        k = max(1, min(5, len(history) // 3))
        first, last = (sum(r["score"] for r in part) / len(part) for part in (history[:k], history[-k:]))
        summary = {
            "task": task,
            "method": args.method,
            "model": args.model,
            "reward": source,
            "reward_source": reward_text,
            "reward_label": args.reward_label,
            "prompts": len(prompts),
            "trainable_parameters": trainable,
            "steps": len(history),
            "score_first": first,
            "score_last": last,
            "kl_last": history[-1]["kl"],
            "kl_coef": result["kl_coef"],
            "seconds": round(result["seconds"], 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "config": asdict(config),
            "method_config": asdict(method_config),
        }
        save_adapter(
            bank, task, out / "adapter", extra={"ppo": {"reward": reward_text, "steps": len(history)}}
        )
        partial = out / f".{VALUE_HEAD_FILE}.tmp-{os.getpid()}"  # a name the lock's clean-up knows as stale
        save_value_head(result["value_head"], partial)
        publish_mode(partial)  # safetensors writes 0600: the umask's mode, as every other file of the run
        os.replace(partial, out / VALUE_HEAD_FILE)
        write_json_atomic(out / "result.json", summary)  # last: a folder with result.json is a finished run
    print(
        f"ppo done: {plural(len(history), 'step')} in {summary['seconds']:.1f} s; mean score of the first "
        f"{plural(k, 'step')} {first:.4f} -> last {k} {last:.4f}; KL {summary['kl_last']:.3f} (kl_coef {result['kl_coef']:.4f}); "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB"
    )
    print(f"adapter: {out / 'adapter'} (value head: {out / VALUE_HEAD_FILE})")


def commands() -> list[Command]:
    return [
        Command(
            "reward",
            "train a reward model on chosen/rejected pairs (Bradley-Terry)",
            add_reward_arguments,
            cmd_reward,
        ),
        Command(
            "dpo",
            "preference-tune a policy adapter with DPO (reference = adapter disabled)",
            add_dpo_arguments,
            cmd_dpo,
        ),
        Command(
            "ppo",
            "RLHF: PPO on an adapter with a reward model, classifier or Python function",
            add_ppo_arguments,
            cmd_ppo,
        ),
    ]
