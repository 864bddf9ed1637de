"""``multitune reward``, ``multitune dpo`` and ``multitune ppo``: flags, run folders (locked, resumable), summaries."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.cli_commands import Command
from multitune.config import TrainConfig, plural
from multitune.errors import ConfigError
from multitune.methods import METHODS
from multitune.preference.dpo import (
    LOSS_HELP,
    LOSS_NAMES,
    LOSSES,
    REFERENCE_ALIASES,
    REFERENCE_HELP,
    REFERENCES,
    check_dpo_policy,
    reference_name,
    train_dpo,
)
from multitune.preference.feedback import is_feedback, load_feedback, served_adapter
from multitune.preference.pairs import R, load_pairs, split_pairs
from multitune.preference.reward import train_reward
from multitune.preference.scoring import REWARD_LABELS, add_reward_task, check_trainable, trainable_methods

# ---- CLI ----------------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"


PAIRS_HELP = (
    "preference pairs (.jsonl .json .csv .parquet): prompt/chosen/rejected columns, or HH "
    "chosen/rejected dialogues split at the last '\\n\\nAssistant:'"
)


def _add_common_arguments(
    parser: argparse.ArgumentParser, output: str, methods: list[str], data_help: str = PAIRS_HELP
) -> None:
    from multitune.flags import add_arguments, add_config_argument, add_method_arguments

    add_config_argument(parser)
    parser.add_argument(
        "--data",
        dest="data.data",
        metavar="FILE",
        help=data_help + "; or feedback:BANK with --task T: the ratings and corrections `multitune serve` "
        "recorded for T (BANK: the served folder, or its --monitor-db)",
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
    parser.add_argument(
        "--monitor-db",
        metavar="URL_OR_FILE",
        help="with --data feedback:BANK, the store the servers shared (default: BANK/monitor.sqlite)",
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
        help="DPO's beta: how far the policy may move from the reference (default: 0.1; SimPO's paper "
        "uses 2-2.5; ORPO: its lambda, the odds-ratio term's weight beside the SFT loss, which separated "
        "held-out pairs only at 10 with 5 epochs in docs/preference.md's LoRA run)",
    )
    parser.add_argument("--loss", choices=LOSSES, default="sigmoid", help=f"{LOSS_HELP} (default: sigmoid)")
    parser.add_argument(
        "--simpo-gamma",
        type=float,
        default=0.5,
        help="--loss simpo: the target margin gamma between the chosen and rejected rewards (default: 0.5)",
    )
    _add_policy_arguments(parser)


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference and the starting adapter of a policy that ``dpo`` and ``kto`` train."""
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


def add_kto_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``multitune kto``: those of ``dpo`` on unpaired rows, plus the two class weights."""
    _add_common_arguments(
        parser,
        "runs/kto",
        trainable_methods(),
        "KTO rows (.jsonl .json .csv .parquet): prompt, completion (or response) and label true/false, as "
        "'multitune feedback export --preferences' writes them",
    )
    parser.add_argument("--beta", type=float, default=0.1, help="KTO's beta, as DPO's (default: 0.1)")
    parser.add_argument(
        "--desirable-weight", type=float, default=1.0, help="lambda_D of the desirable rows (default: 1)"
    )
    parser.add_argument(
        "--undesirable-weight",
        type=float,
        default=1.0,
        help="lambda_U of the undesirable rows (default: 1; the paper keeps lambda_D n_D / (lambda_U n_U) "
        "between 1 and 4/3)",
    )
    _add_policy_arguments(parser)


def cmd_kto(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune kto``: KTO on unpaired desirable/undesirable rows; the folder of ``dpo``."""
    from multitune.preference.kto import load_unpaired, train_kto
    from multitune.training.distributed import launched

    reference = reference_name(args.reference)
    config = _run_config(args)
    if not args.init_adapter:
        check_trainable(config.method)
    with launched(config, args.resume) as (config, main):
        with run_folder(config.output, "multitune kto", args.resume) as start:
            done = _finished(Path(config.output), "policy") if args.resume else None
            if done is not None:
                return done
            train, held = _load_splits(config, args.validation_ratio, load_unpaired, args.monitor_db)
            bank = _load_bank(config)
            args.init_adapter = _add_policy(bank, config, args.init_adapter)  # the served one, from feedback
            method = bank.tasks[config.task].method
            trainable = sum(p.numel() for p in bank.task_parameters(config.task).values())
            start(_settings_yaml(args, config))
            result = train_kto(
                bank, config.task, train, held, config.train, args.beta, args.desirable_weight,
                args.undesirable_weight, not args.quiet and main, reference, config.output, args.resume,
            )  # fmt: skip
            before, after = result["before"] or {}, result["after"] or {}
            summary = {
                "command": "kto",
                "task": config.task,
                "method": method,
                "model": config.model,
                "beta": args.beta,
                "desirable_weight": args.desirable_weight,
                "undesirable_weight": args.undesirable_weight,
                "reference": reference,
                "rows": {"train": len(train), "validation": len(held), **result["rows"]},
                "trainable_parameters": trainable,
                "steps": result["steps"],
                "best_step": result["best_step"],
                "seconds": result["seconds"],
                "accuracy": {"before": before.get("accuracy"), "after": after.get("accuracy")},
                "evals": result["evals"],
                "settings": _settings(config),
            }
            out = Path(config.output)
            _save(bank, config.task, out, summary, config.train.keep_checkpoint,
                  {"kto": {"beta": args.beta, "reference": reference}})  # fmt: skip
            write_report(out, summary, result["history"], result["evals"], main)
        print(
            f"trained '{config.task}' ({method}) with KTO (beta {args.beta}) on {config.model}: {trainable:,} "
            f"trainable parameters, {plural(len(train), 'row')} ({result['rows']['desirable']} desirable), "
            f"{plural(result['steps'], 'step')}, {result['seconds']:.1f} s"
        )
        print(
            f"held-out rows on the right side of the reference point: {_fmt(before.get('accuracy'))} -> "
            f"{_fmt(after.get('accuracy'))} on {plural(len(held), 'row')}"
        )
        _print_kept(result)
        print(f"adapter: {out / 'adapter'}")
        return summary


def _run_config(args: argparse.Namespace) -> Any:
    """The flags (defaults < --config file < flags) as a RunConfig, validated as ``multitune train``'s are."""
    from multitune.flags import load_run_config

    config = load_run_config(args)
    if is_feedback(config.data.data) and not args.task:
        raise ConfigError(
            f"--data {config.data.data} reads the feedback of one served task; pass --task with its name "
            "(the trained task gets that name)"
        )
    if not 0 < args.validation_ratio < 1:
        raise ConfigError(f"--validation-ratio must be between 0 and 1 (got {args.validation_ratio})")
    if not config.data.data:
        columns = (
            "prompt/completion/label rows"
            if hasattr(args, "desirable_weight")
            else "prompt/chosen/rejected or HH chosen/rejected"
        )
        raise ConfigError(
            f"no preference data given; pass --data FILE (.jsonl .json .csv .parquet with {columns})"
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


def _finished(folder: Path, what: str) -> dict[str, Any] | None:
    """The result of a run that already finished in ``folder`` (resuming it changes nothing), said so."""
    import json

    try:
        done = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    print(f"{what} '{done['task']}' finished in an earlier run; adapter: {folder / 'adapter'}")
    return done


def _load_splits(
    config: Any, ratio: float, load: Callable[..., list[R]], monitor_db: str | None = None
) -> tuple[list[R], list[R]]:
    """(train, held out) rows of ``--data`` as ``load`` reads them (pairs; KTO's unpaired rows)."""
    data = config.data
    pairs: list[Any]
    if is_feedback(data.data):  # the served task's ratings and corrections, straight from the store
        pairs = list(load_feedback(data.data, config.task, load is load_pairs, monitor_db))
    else:
        pairs = load(data.data, drop_empty=bool(data.drop_empty))
    if data.validation_data:
        train, held = pairs, load(data.validation_data, drop_empty=bool(data.drop_empty))
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
    return MultiTaskModel(load_base(config.model, device=device, quantize=config.train.quantize))


def _settings(config: Any) -> dict[str, Any]:
    return {
        "train": dataclasses.asdict(config.train),
        config.method: dataclasses.asdict(config.method_config()),
    }


def _settings_yaml(args: argparse.Namespace, config: Any) -> str:
    """config.yaml: this command's settings as resolved, in the layout its ``--config`` reads back."""
    from multitune.flags import command_yaml, run_config_values

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


def write_report(
    out: Path, summary: dict[str, Any], steps: list[dict], evals: list[dict], main: bool
) -> None:
    """curves.png and report.html beside metrics.jsonl (rank 0 of a launch alone); says where."""
    if not main:
        return
    from multitune.preference.report import write_run_report

    paths = write_run_report(out, summary, steps, evals)
    print(f"report: {paths['html']} (curves: {paths['png']})")


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
    from multitune.training.distributed import launched

    config = _run_config(args)
    check_trainable(config.method, head=True)
    with launched(config, args.resume) as (config, main):  # torchrun: one of N processes (distributed.py)
        return _reward(args, config, main)


def _reward(args: argparse.Namespace, config: Any, main: bool) -> dict[str, Any]:
    with run_folder(config.output, "multitune reward", args.resume) as start:
        done = _finished(Path(config.output), "reward model") if args.resume else None
        if done is not None:
            return done
        train, held = _load_splits(
            config, args.validation_ratio, load_pairs, args.monitor_db
        )  # the user's files first: they fail fast
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
            progress=not args.quiet and main,
            run_dir=config.output,
            resume=args.resume,
        )
        before, after = result["before"] or {}, result["after"] or {}
        summary = {
            "command": "reward",
            "task": config.task,
            "method": config.method,
            "model": config.model,
            "quantize": config.train.quantize,
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
        write_report(out, summary, result["history"], result["evals"], main)
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


def _add_policy(bank: MultiTaskModel, config: Any, init_adapter: str | None) -> str | None:
    """The policy task: a fresh one of ``--method``, or ``--init-adapter``'s trained generation adapter (the
    SFT-then-DPO recipe), refused when that adapter is not a generation task. Trained on ``feedback:BANK``
    without ``--init-adapter``, the policy starts from the task BANK serves under that name, if it holds one.
    Returns the adapter started from (None: a fresh task), which config.yaml and result.json record."""
    if not init_adapter and is_feedback(config.data.data):
        served = served_adapter(config.data.data, config.task)
        if served is not None:
            print(
                f"starting from the served task '{config.task}' ({served}); pass --init-adapter to start elsewhere"
            )
            init_adapter = str(served)
    if not init_adapter:
        bank.add_task(config.task, "generation", config.method, config.method_config())
        return None
    from multitune.api import adapter_folder
    from multitune.storage import load_adapter

    spec = load_adapter(bank, adapter_folder(init_adapter), config.task)
    if spec.kind != "generation":
        raise ConfigError(f"{init_adapter} holds a {spec.kind} task; DPO starts from a generation adapter")
    return init_adapter


def _dpo_summary(
    args: argparse.Namespace,
    config: Any,
    method: str,
    reference: str,
    pairs: tuple[int, int],
    trainable: int,
    result: dict[str, Any],
) -> dict[str, Any]:
    """result.json of a DPO run: the settings, the pair counts (train, held-out) and each held-out measure
    before and after, so that a reader sees what DPO changed without the metrics file."""
    before, after = result["before"] or {}, result["after"] or {}
    return {
        "command": "dpo",
        "task": config.task,
        "method": method,
        "model": config.model,
        "quantize": config.train.quantize,
        "beta": args.beta,
        "loss": args.loss,
        **({"simpo_gamma": args.simpo_gamma} if args.loss == "simpo" else {}),
        "reference": result["reference"],
        "init_adapter": args.init_adapter,
        "pairs": {"train": pairs[0], "validation": pairs[1]},
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


def cmd_dpo(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune dpo``: DPO on preference pairs; write config.yaml, metrics.jsonl, DIR/adapter and
    DIR/result.json."""
    if not args.beta > 0:
        raise ConfigError(f"--beta must be > 0 (got {args.beta}); 0.1 is usual")
    from multitune.training.distributed import launched

    reference = reference_name(args.reference)
    config = _run_config(args)
    if not args.init_adapter:
        check_trainable(config.method)
    with launched(config, args.resume) as (config, main):  # torchrun: one of N processes (distributed.py)
        return _dpo(args, config, reference, main)


def _dpo(args: argparse.Namespace, config: Any, reference: str, main: bool) -> dict[str, Any]:
    with run_folder(config.output, "multitune dpo", args.resume) as start:
        done = _finished(Path(config.output), "policy") if args.resume else None
        if done is not None:
            return done
        train, held = _load_splits(config, args.validation_ratio, load_pairs, args.monitor_db)
        bank = _load_bank(config)
        args.init_adapter = _add_policy(bank, config, args.init_adapter)  # the served one, from feedback
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
            progress=not args.quiet and main,
            reference=reference,
            run_dir=config.output,
            resume=args.resume,
            loss=args.loss,
            gamma=args.simpo_gamma,
        )
        before, after = result["before"] or {}, result["after"] or {}
        summary = _dpo_summary(args, config, method, reference, (len(train), len(held)), trainable, result)
        out = Path(config.output)
        _save(
            bank,
            config.task,
            out,
            summary,
            config.train.keep_checkpoint,
            {
                "dpo": {"beta": args.beta, "reference": result["reference"], "loss": args.loss},
                "metrics": {"preference_accuracy": summary["preference_accuracy"]},
            },
        )
        write_report(out, summary, result["history"], result["evals"], main)
    print(
        f"trained '{config.task}' ({method}) with {LOSS_NAMES[args.loss]} (beta {args.beta}) on {config.model}: {trainable:,} "
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


def commands() -> list[Command]:
    from multitune.preference.grpo_cli import add_grpo_arguments, cmd_grpo
    from multitune.preference.ppo_cli import add_ppo_arguments, cmd_ppo

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
            "kto",
            "preference-tune a policy adapter with KTO on unpaired desirable/undesirable completions",
            add_kto_arguments,
            cmd_kto,
        ),
        Command(
            "ppo",
            "RLHF: PPO on an adapter with a reward model, classifier or Python function",
            add_ppo_arguments,
            cmd_ppo,
        ),
        Command(
            "grpo",
            "GRPO or RLOO: group-sampled policy optimisation with a reward model, classifier or Python function",
            add_grpo_arguments,
            cmd_grpo,
        ),
    ]
