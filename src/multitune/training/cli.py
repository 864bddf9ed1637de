"""``multitune train``, ``train-multi``, ``eval``, ``predict`` and ``ensemble``: flags and entry points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from multitune.cli_commands import Command, columns_of, device_of
from multitune.config import plural
from multitune.errors import ConfigError

if TYPE_CHECKING:
    from multitune.data import TaskKind


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for key, value in metrics.items():
        print(f"  {key:<12} {value:.4f}" if isinstance(value, float) else f"  {key:<12} {value}")


def cmd_train(args: argparse.Namespace) -> None:
    from multitune.flags import load_run_config
    from multitune.training.distributed import launched
    from multitune.training.train import run

    config = load_run_config(args)
    with launched(config, args.resume) as (config, main):  # torchrun: one of N processes (distributed.py)
        summary = run(config, resume=args.resume, progress=not args.quiet and main)
        if not main:
            return
    print(
        f"trained {summary['method']} task '{summary['task']}' on {summary['model']}: "
        f"{plural(summary['trainable_parameters'], 'trainable parameter')}, {plural(summary['steps'], 'step')}, "
        f"{summary['train_seconds']:.1f} s"
    )
    _print_metrics(f"test ({plural(summary['examples']['test'], 'example')}):", summary["test"])
    if "test_before" in summary:  # a domain task: the bare base and the adapted one on the same held-out text
        print(domain_line(summary))
    print(f"adapter: {Path(config.output) / 'adapter'}")
    if "golden" in summary:
        from multitune.risks.golden import golden_line

        print(golden_line(summary["golden"]))
    if summary.get("dp"):
        dp = summary["dp"]
        print(
            f"differential privacy: epsilon {dp['epsilon']:.3f} spent (target {dp['target_epsilon']}) at delta "
            f"{dp['delta']:.3g}; noise multiplier {dp['noise_multiplier']:.4f}, max grad norm "
            f"{dp['max_grad_norm']}, sample rate {dp['sample_rate']:.4g}, {dp['steps']} steps, "
            f"{dp['accountant'].upper()} accountant"
        )
    if summary.get("problem"):  # last: what a user reads first after a run
        print(f"warning: {summary['problem']}")


def domain_line(summary: dict) -> str:
    """One line: a domain task's held-out score before (the bare base) and after adaptation."""
    before, after = summary["test_before"], summary["test"]
    if not after:
        return "domain: no held-out text (the test split is empty), so nothing to compare"
    metric = "perplexity" if "perplexity" in after else "loss"
    what = {"clm": "next-token", "mlm": "masked-LM", "simcse": "SimCSE"}[summary["objective"]]
    return (
        f"domain ({what}): held-out {metric} {before[metric]:.4g} (bare base) -> {after[metric]:.4g} (adapted), "
        f"loss {before['loss']:.4f} -> {after['loss']:.4f} on {plural(summary['examples']['test'], 'document')}"
    )


def cmd_train_multi(args: argparse.Namespace) -> None:
    from multitune.training.distributed import launched
    from multitune.training.multitask import load_multi_config, run_multitask

    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in ("model", "output", "sampling", "temperature") or k.startswith("train.")
    }
    config = load_multi_config(args.config, overrides)
    with launched(config, args.resume) as (config, main):  # torchrun: one of N processes (distributed.py)
        summary = run_multitask(config, progress=not args.quiet and main, resume=args.resume)
        if not main:
            return
    print(
        f"trained {len(summary['tasks'])} tasks together on {summary['model']} ({summary['sampling']} sampling)"
    )
    for name, task in summary["tasks"].items():
        frozen = ", stopped early" if task["stopped_early"] else ""
        _print_metrics(
            f"{name} ({task['method']}, {task['trainable_parameters']:,} trainable, "
            f"{plural(task['steps'], 'step')}{frozen}) test ({plural(task['examples']['test'], 'example')}):",
            task["test"],
        )
    folders = ", ".join(str(Path(config.output) / name) for name in summary["tasks"])
    print(f"adapters: {folders} (serve them together: multitune serve {config.output})")
    for task in summary["tasks"].values():
        if task.get("problem"):
            print(f"warning: {task['problem']}")


def _examples_to_score(args: argparse.Namespace, kind: TaskKind):  # noqa: ANN202  (list[data.Example], lazily)
    """(examples, where) of eval: --data, or the run's own test split rebuilt from its config.yaml."""
    from multitune.data import load_examples

    if args.data:
        return load_examples(args.data, kind, columns_of(args), drop_empty=args.drop_empty), args.data
    import yaml

    from multitune.config import DataConfig

    config_file = Path(args.run) / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"no --data given and {config_file} not found; pass --data FILE to evaluate on")
    d = yaml.safe_load(config_file.read_text())["data"]  # the split is deterministic
    return DataConfig(**d).splits(kind).test, f"the test split of {d['data']}"


def _eval_ensemble(args: argparse.Namespace) -> None:
    from multitune.training.ensemble import evaluate_ensemble, load_ensemble

    bank, members, max_length = load_ensemble(args.run, model=args.model, device=device_of(args))
    examples, where = _examples_to_score(args, "classification")
    labels = bank.tasks[members[0]].labels
    unseen = sorted({ex.label for ex in examples if ex.label is not None} - set(labels))
    if unseen:
        raise ConfigError(f"labels {unseen[:5]} in {where} are not among the ensemble's labels {labels[:10]}")
    metrics = evaluate_ensemble(bank, members, examples, max_length, args.batch_size)
    each = metrics.pop("members")
    _print_metrics(
        f"majority vote of {plural(len(members), 'member')} on {where} ({plural(len(examples), 'example')}):",
        metrics,
    )
    print("members: " + ", ".join(f"{m} {r['accuracy']:.4f}" for m, r in each.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**metrics, "members": each}, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from multitune.api import load
    from multitune.training.ensemble import is_ensemble

    if is_ensemble(args.run):
        return _eval_ensemble(args)
    _refuse_domain(args.run, "eval")
    task = load(args.run, model=args.model, device=device_of(args))
    examples, where = _examples_to_score(args, task.spec.kind)
    unseen = sorted({ex.label for ex in examples if ex.label is not None} - set(task.labels))
    if task.spec.kind == "classification" and unseen:
        raise ConfigError(
            f"labels {unseen[:5]} in {where} are not among the task's labels {task.labels[:10]}"
        )
    metrics = task.evaluate(examples, batch_size=args.batch_size)
    _print_metrics(f"{task.task} on {where} ({plural(len(examples), 'example')}):", metrics)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from multitune.api import load
    from multitune.data import load_inputs
    from multitune.tables import write_table
    from multitune.training.ensemble import ensemble_predictions, is_ensemble, load_ensemble

    if is_ensemble(args.run):  # the majority vote, and the share of members that cast it
        rows, examples = load_inputs(args.input, "classification", columns_of(args))
        bank, members, max_length = load_ensemble(args.run, model=args.model, device=device_of(args))
        for row, (label, agreement) in zip(
            rows, ensemble_predictions(bank, members, examples, max_length, args.batch_size), strict=True
        ):
            row["prediction"], row["agreement"] = label, agreement
        write_table(args.output, rows)
        print(
            f"wrote {plural(len(rows), 'prediction')} (majority vote of {plural(len(members), 'member')}) "
            f"to {args.output}"
        )
        return
    kind = _refuse_domain(args.run, "predict")
    rows, examples = load_inputs(args.input, kind, columns_of(args))  # the user's file first: it fails fast
    task = load(args.run, model=args.model, device=device_of(args))
    if task.spec.kind == "classification":
        probs = task.predict_proba(examples, batch_size=args.batch_size)
        for row, p in zip(rows, probs, strict=True):
            row["prediction"] = task.labels[int(p.argmax())]
            row["probability"] = round(float(p.max()), 6)
    else:
        texts = task.predict(examples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        for row, text in zip(rows, texts, strict=True):
            row["prediction"] = text
    write_table(args.output, rows)
    print(f"wrote {plural(len(rows), 'prediction')} to {args.output}")


def _refuse_domain(run: str, command: str) -> TaskKind:
    """The kind of the task in ``run``; a domain task is refused: it has nothing to score or predict."""
    from multitune.api import adapter_folder
    from multitune.data import task_kind
    from multitune.domain import refusal
    from multitune.storage import read_adapter_config

    task = read_adapter_config(adapter_folder(run))["task"]
    if task["kind"] == "domain":
        raise ConfigError(refusal(task["name"], task.get("objective"), command))
    return task_kind(task["kind"])


def _add_io(parser: argparse.ArgumentParser) -> None:
    from multitune.config import DEVICE_HELP

    parser.add_argument(
        "run",
        help="run folder (or adapter folder) written by 'multitune train', or the run "
        "folder of 'multitune ensemble' (its members vote)",
    )
    parser.add_argument("--model", help="load the adapter onto this base instead of the recorded one")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    for name in ("text", "text-pair", "label", "prompt", "input", "response"):
        parser.add_argument(
            f"--{name}-column", help=f"column with the {name.replace('-', ' ')} (default: auto)"
        )


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from multitune.flags import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_multi_arguments(p: argparse.ArgumentParser) -> None:
    from multitune.config import TrainConfig
    from multitune.flags import add_arguments

    p.add_argument(
        "--config",
        required=True,
        help="YAML with 'tasks:' (name, method, kind, data, method settings) "
        "and shared settings (model, sampling, temperature, train:)",
    )
    p.add_argument("--model", help="base model (overrides the file's)")
    p.add_argument(
        "--output", help="bank folder to write: OUTPUT/TASK/adapter.json ... (overrides the file's)"
    )
    p.add_argument("--sampling", help="task of each row: proportional or temperature (overrides the file's)")
    p.add_argument(
        "--temperature", type=float, help="temperature sampling: p ~ size^(1/T) (overrides the file's)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    add_arguments(p, TrainConfig, dest_prefix="train.")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_io(p)
    p.add_argument("--data", help="labelled file to score (default: the run's test split)")
    p.add_argument(
        "--drop-empty",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="drop rows with an empty text or label",
    )
    p.add_argument("--json", help="also write the metrics to this JSON file")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    _add_io(p)
    p.add_argument("--input", required=True, help="file to predict (.csv .tsv .json .jsonl .parquet)")
    p.add_argument("--output", required=True, help="where to write the rows with a 'prediction' column")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="generation: tokens to generate (default: 64)"
    )


def commands() -> list[Command]:
    from multitune.training import ensemble

    return [
        Command(
            "train", "train one task with one method and score its test split", add_train_arguments, cmd_train
        ),
        Command(
            "train-multi",
            "train several tasks together from mixed batches (YAML list of tasks)",
            add_train_multi_arguments,
            cmd_train_multi,
        ),
        Command(
            "eval",
            "score a trained task on a labelled file (default: its test split)",
            add_eval_arguments,
            cmd_eval,
        ),
        Command(
            "predict",
            "predict every row of a file and write the rows with predictions",
            add_predict_arguments,
            cmd_predict,
        ),
        Command(
            "ensemble",
            "train N soft prompts of one classification task; eval and predict use their majority vote",
            ensemble.add_ensemble_arguments,
            ensemble.cmd_ensemble,
        ),
    ]
