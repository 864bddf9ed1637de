"""``multitune <command>``: a thin dispatch onto the library's functions.

User mistakes (:class:`multitune.errors.MultituneError`) print one line, ``error: ...``, and exit 2;
they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from multitune.config import plural
from multitune.errors import ConfigError, MultituneError


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for key, value in metrics.items():
        print(f"  {key:<12} {value:.4f}" if isinstance(value, float) else f"  {key:<12} {value}")


def cmd_train(args: argparse.Namespace) -> None:
    from multitune.config import load_run_config
    from multitune.training.train import run

    config = load_run_config(args)
    summary = run(config, resume=args.resume, progress=not args.quiet)
    print(
        f"trained {summary['method']} task '{summary['task']}' on {summary['model']}: "
        f"{plural(summary['trainable_parameters'], 'trainable parameter')}, {plural(summary['steps'], 'step')}, "
        f"{summary['train_seconds']:.1f} s"
    )
    _print_metrics(f"test ({plural(summary['examples']['test'], 'example')}):", summary["test"])
    print(f"adapter: {Path(config.output) / 'adapter'}")


def cmd_train_multi(args: argparse.Namespace) -> None:
    from multitune.training.multitask import load_multi_config, run_multitask

    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in ("model", "output", "sampling", "temperature") or k.startswith("train.")
    }
    config = load_multi_config(args.config, overrides)
    summary = run_multitask(config, progress=not args.quiet)
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


def _columns(args: argparse.Namespace):  # noqa: ANN202  (data.Columns, imported lazily)
    from multitune.data import Columns

    return Columns(
        args.text_column,
        args.text_pair_column,
        args.label_column,
        args.prompt_column,
        args.input_column,
        args.response_column,
    )


def _device(args: argparse.Namespace) -> str | None:
    """The --device given (None: auto, cuda when available); a misspelt one is a ConfigError."""
    from multitune.config import device_problem

    problem = device_problem(args.device)
    if problem:
        raise ConfigError(problem)
    return None if args.device == "auto" else args.device


def _examples_to_score(args: argparse.Namespace, kind: str):  # noqa: ANN202  (list[data.Example], lazily)
    """(examples, where) of eval: --data, or the run's own test split rebuilt from its config.yaml."""
    from multitune.data import load_examples

    if args.data:
        return load_examples(args.data, kind, _columns(args), drop_empty=args.drop_empty), args.data
    import yaml

    from multitune.config import DataConfig

    config_file = Path(args.run) / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"no --data given and {config_file} not found; pass --data FILE to evaluate on")
    d = yaml.safe_load(config_file.read_text())["data"]  # the split is deterministic
    return DataConfig(**d).splits(kind).test, f"the test split of {d['data']}"


def _eval_ensemble(args: argparse.Namespace) -> None:
    from multitune.training.ensemble import evaluate_ensemble, load_ensemble

    bank, members, max_length = load_ensemble(args.run, model=args.model, device=_device(args))
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
    task = load(args.run, model=args.model, device=_device(args))
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
    from multitune.api import adapter_folder, load
    from multitune.data import load_inputs, write_table
    from multitune.storage import read_adapter_config
    from multitune.training.ensemble import ensemble_predictions, is_ensemble, load_ensemble

    if is_ensemble(args.run):  # the majority vote, and the share of members that cast it
        rows, examples = load_inputs(args.input, "classification", _columns(args))
        bank, members, max_length = load_ensemble(args.run, model=args.model, device=_device(args))
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
    kind = read_adapter_config(adapter_folder(args.run))["task"]["kind"]
    rows, examples = load_inputs(args.input, kind, _columns(args))  # the user's file first: it fails fast
    task = load(args.run, model=args.model, device=_device(args))
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


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's first command: every method compared on a task the project generates itself."""
    from multitune.compare.run import compare
    from multitune.compare.settings import CompareConfig, default_methods
    from multitune.config import DataConfig, TrainConfig
    from multitune.demo import write_demo_csv
    from multitune.storage import output_lock

    methods = args.methods or default_methods()
    out = Path(args.output)
    with output_lock(out, "multitune demo"):  # the data file and the comparison: one demo at a time
        if (
            not args.resume and (out / "compare" / "compare.json").exists()
        ):  # the demo's own folder: start afresh
            import shutil

            print(
                f"demo: replacing the previous demo comparison in {out / 'compare'} (--resume continues it instead)"
            )
            with output_lock(out / "compare", "multitune demo"):  # never under a compare running there
                shutil.rmtree(out / "compare")
        data = write_demo_csv(out / "data.csv", n=args.examples)
        config = CompareConfig(
            model=args.model,
            task="support",
            methods=methods,
            trials=args.trials,
            max_epochs=2,
            output=str(out / "compare"),
            progress=not args.quiet,
            command="multitune " + " ".join(sys.argv[1:]),
            data=DataConfig(data=str(data), text_column="message", label_column="intent"),
            train=TrainConfig(batch_size=16, max_length=64),
        )
        print(
            f"demo: {', '.join(methods)} on {args.model}, {args.examples} generated support messages "
            f"(4 intents) in {data}, {args.trials} search trials per method"
        )
        summary = compare(config)
    _print_comparison(summary)
    print(
        "\nyour own CSV: multitune compare --data my.csv --text-column review --label-column stars "
        "--model minilm --trials 8 --output runs/mine"
    )


def compare_config(args: argparse.Namespace):  # noqa: ANN201  (compare.CompareConfig, imported lazily)
    """The compare command's settings: its own flags, the data/train flags, and fixed method settings."""
    import dataclasses

    from multitune.compare.settings import CompareConfig
    from multitune.config import DataConfig, TrainConfig
    from multitune.methods import METHODS

    values = vars(args)
    sections: dict[str, dict] = {"data.": {}, "train.": {}}
    method_values: dict[str, dict] = {}
    for key, value in values.items():
        if value is None:
            continue
        for prefix in sections:
            if key.startswith(prefix):
                sections[prefix][key[len(prefix) :]] = value
        if key.startswith("methods."):
            _, name, setting = key.split(".", 2)
            method_values.setdefault(name, {})[setting] = value
    config = CompareConfig(
        model=args.model,
        task=args.task,
        kind=args.kind,
        methods=args.methods,
        trials=args.trials,
        max_epochs=args.max_epochs,
        output=args.output,
        storage=args.storage,
        study_name=args.study_name,
        search_only=args.search_only,
        progress=not args.quiet,
        seed=values.get("train.seed") or 0,
        command="multitune " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else "",
        data=DataConfig(**sections["data."]),
        train=dataclasses.replace(TrainConfig(), **sections["train."]),
        method_settings={n: METHODS[n].config_class(**v) for n, v in method_values.items() if n in METHODS},
    )
    return config


def cmd_compare(args: argparse.Namespace) -> None:
    from multitune.compare.run import compare

    config = compare_config(args)
    summary = compare(config)
    _print_comparison(summary)
    if summary["failures"]:
        raise ConfigError(
            f"{len(summary['failures'])} method(s) failed ({', '.join(summary['failures'])}); "
            "the others are saved; fix the cause and rerun the same command to finish"
        )


def _print_comparison(summary: dict) -> None:
    results = summary["results"]
    if not results:
        return
    metric = results[0]["metric"]
    print(
        f"\n{'method':<10} {'trainable':>12} {'stored':>10} {'train s':>8} {'ms/ex':>7}  test {metric} [95% CI]"
    )
    for r in results:
        ci = r.get("test_ci", {}).get(metric)
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        stored = r["stored_bytes"] / 1e6
        print(
            f"{r['method']:<10} {r['trainable_parameters']:>12,} {stored:>8.2f}MB {r['train_seconds']:>8.1f} "
            f"{(r.get('latency_ms') or 0):>7.1f}  {r['test'].get(metric, float('nan')):.3f}{interval}"
        )
    if "report" in summary:
        print(
            f"\nreport: {summary['report']['html']} (and report.md, plots/); adapters: "
            f"{Path(summary['report']['md']).parent / 'bank'} (serve them together: Engine.from_folder)"
        )


def cmd_methods(args: argparse.Namespace) -> None:
    from multitune.compare.catalog import base_parameters, method_facts
    from multitune.models import load_base

    if args.labels < 2:
        raise ConfigError(f"--labels must be >= 2 (got {args.labels})")
    base = None if args.no_model else load_base(args.model, device="cpu")
    facts = method_facts(base, args.kind, args.labels)
    if base is not None:
        total = base_parameters(base)
        what = f"{args.kind}, {args.labels} labels" if args.kind == "classification" else args.kind
        print(f"methods on {args.model} ({total:,} parameters; {what}; default settings):\n")
        print(
            f"{'method':<10} {'trainable':>12} {'% of base':>10} {'stored':>12} {'bytes/task':>10}  summary"
        )
        for f in facts:
            if f.trainable is None:
                print(f"{f.name:<10} {'n/a':>12} {'':>10} {'':>12} {'':>10}  {f.problem}")
                continue
            mb = (
                f"{(f.stored_bytes or 0) / 1e6:.2f} MB"
                if (f.stored_bytes or 0) >= 1e5
                else f"{(f.stored_bytes or 0) / 1e3:.1f} kB"
            )
            print(
                f"{f.name:<10} {f.trainable:>12,} {100 * f.trainable / total:>9.3f}% {f.stored or 0:>12,} {mb:>10}  "
                f"{f.summary}"
            )
        print()
    for f in facts:
        print(f"{f.name}: {f.summary}")
        for s in f.settings:
            print(f"  {s.flag:<34} {s.help}")
    print("\nuse one: multitune train --method NAME [its flags] --data FILE ...")


def cmd_export_peft(args: argparse.Namespace) -> None:
    from multitune.api import load
    from multitune.interop.peft import export_peft

    task = load(args.run, model=args.model, device="cpu")
    folder = export_peft(task.bank, task.task, args.output)
    extra = (
        (
            f" (the classification head and labels are beside it, in {folder}/multitune_head.safetensors and "
            "multitune_task.json, which PEFT ignores and import-peft reads)"
        )
        if task.spec.kind == "classification"
        else ""
    )
    print(
        f"wrote the {task.spec.method} adapter of '{task.task}' in the peft package's format to {folder}{extra}"
    )


def cmd_import_peft(args: argparse.Namespace) -> None:
    from multitune.bank import MultiTaskModel
    from multitune.interop.peft import HEAD_FILE, import_peft, read_peft_config
    from multitune.models import load_base
    from multitune.storage import save_adapter

    source = Path(args.folder)
    model = args.model or read_peft_config(source).get("base_model_name_or_path")
    if not model:
        raise ConfigError(f"{source}/adapter_config.json names no base model; pass --model")
    bank = MultiTaskModel(load_base(model, device="cpu"))
    spec = import_peft(bank, source, args.task, args.kind, args.labels)
    out = save_adapter(bank, args.task, args.output)
    head = ""
    if spec.kind == "classification":
        head = f", labels {', '.join(spec.labels)}" + (
            ""
            if (source / HEAD_FILE).is_file() and not args.labels
            else "; its head is untrained: train it before use"
        )
    print(f"imported {spec.method} {spec.kind} task '{args.task}' on {model} into {out}{head}")


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


def _comma_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from multitune.compare.settings import default_methods
    from multitune.config import (
        DataConfig,
        TrainConfig,
        add_arguments,
        add_config_argument,
        add_method_arguments,
    )

    add_config_argument(p)
    p.add_argument("--model", default="minilm", help="short name (minilm, smollm2-135m), HF folder or .gguf")
    p.add_argument(
        "--methods",
        type=_comma_list,
        default=default_methods(),
        help=f"comma-separated methods to compare (default: {','.join(default_methods())})",
    )
    p.add_argument("--trials", type=int, default=8, help="search trials per method (default: 8)")
    p.add_argument(
        "--max-epochs", type=int, default=3, help="largest number of epochs a trial may use (default: 3)"
    )
    p.add_argument(
        "--output", default="runs/compare", help="folder: study, results, bank of adapters, report"
    )
    p.add_argument(
        "--storage",
        help="Optuna storage URL shared by several workers, e.g. postgresql://user@host/db "
        "(default: OUTPUT/study.db, SQLite)",
    )
    p.add_argument("--study-name", help="prefix of the study names (default: the task name)")
    p.add_argument(
        "--search-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="only add trials to the shared studies (a helper worker); no final runs, no report "
        "(default: off)",
    )
    p.add_argument(
        "--task", default="task", help="task name; adapters go to OUTPUT/bank/TASK-METHOD (default: task)"
    )
    p.add_argument(
        "--kind",
        default="classification",
        choices=["classification", "generation"],
        help="task kind: classification (scored on accuracy) or generation (ROUGE-L) "
        "(default: classification)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (trial lines are still printed)")
    add_arguments(p, DataConfig, dest_prefix="data.")
    add_arguments(p, TrainConfig, dest_prefix="train.")
    add_method_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    from multitune.config import TrainConfig, add_arguments, add_run_arguments

    parser = argparse.ArgumentParser(prog="multitune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("train", help="train one task with one method and score its test split")
    add_run_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser(
        "train-multi", help="train several tasks together from mixed batches (YAML list of tasks)"
    )
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
    add_arguments(p, TrainConfig, dest_prefix="train.")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_multi)

    p = commands.add_parser(
        "compare", help="search, train and test several methods on your data; write a report"
    )
    _add_compare_arguments(p)
    p.set_defaults(func=cmd_compare)

    from multitune.preference import cli as preference
    from multitune.serve import cli as server
    from multitune.training import ensemble

    # Commands whose module defines its own flags (add_X_arguments) and entry point (cmd_X).
    for name, module, help_text in [
        ("serve", server, "serve a bank of tasks over an OpenAI-compatible HTTP API (mixed batches)"),
        ("reward", preference, "train a reward model on chosen/rejected pairs (Bradley-Terry)"),
        ("dpo", preference, "preference-tune a policy adapter with DPO (reference = adapter disabled)"),
        ("ppo", preference, "RLHF: PPO on an adapter with a reward model, classifier or Python function"),
        (
            "ensemble",
            ensemble,
            "train N soft prompts of one classification task; eval and predict use their majority vote",
        ),
    ]:
        p = commands.add_parser(name, help=help_text)
        getattr(module, f"add_{name}_arguments")(p)
        p.set_defaults(func=getattr(module, f"cmd_{name}"))

    p = commands.add_parser("eval", help="score a trained task on a labelled file (default: its test split)")
    _add_io(p)
    p.add_argument("--data", help="labelled file to score (default: the run's test split)")
    p.add_argument(
        "--drop-empty",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="drop rows with an empty text or label",
    )
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("predict", help="predict every row of a file and write the rows with predictions")
    _add_io(p)
    p.add_argument("--input", required=True, help="file to predict (.csv .tsv .json .jsonl .parquet)")
    p.add_argument("--output", required=True, help="where to write the rows with a 'prediction' column")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="generation: tokens to generate (default: 64)"
    )
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("methods", help="list the methods, their settings and their cost on a model")
    p.add_argument("--model", default="minilm", help="count parameters on this base (default: minilm)")
    p.add_argument(
        "--kind",
        default="classification",
        choices=["classification", "generation"],
        help="the task kind to count for (default: classification)",
    )
    p.add_argument("--labels", type=int, default=2, help="classification: number of labels (default: 2)")
    p.add_argument(
        "--no-model", action="store_true", help="list methods and settings without loading a model"
    )
    p.set_defaults(func=cmd_methods)

    p = commands.add_parser("export-peft", help="write a trained task as a peft package adapter folder")
    p.add_argument("run", help="run folder (or adapter folder) written by 'multitune train'")
    p.add_argument("--output", required=True, help="the PEFT folder to write")
    p.add_argument("--model", help="the base to load it on (default: the recorded one)")
    p.set_defaults(func=cmd_export_peft)

    p = commands.add_parser("import-peft", help="turn a peft package adapter folder into a multitune task")
    p.add_argument("folder", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--output", required=True, help="the multitune adapter folder to write")
    p.add_argument("--task", default="imported", help="task name (default: imported)")
    p.add_argument("--model", help="base model (default: the one the PEFT config names)")
    p.add_argument(
        "--kind",
        choices=["classification", "generation"],
        help="the task's kind (default: what the folder says: a multitune export's task file, else PEFT's "
        "task_type SEQ_CLS / CAUSAL_LM / SEQ_2_SEQ_LM, else classification on an encoder and generation "
        "otherwise)",
    )
    p.add_argument(
        "--labels",
        type=_comma_list,
        metavar="A,B,...",
        help="classification: the label names, comma-separated, when the folder does not hold them "
        "(a folder written by 'multitune export-peft' does, with the head)",
    )
    p.set_defaults(func=cmd_import_peft)

    p = commands.add_parser(
        "demo", help="compare every method on a generated task, with a report (minutes on CPU)"
    )
    p.add_argument(
        "--output", default="runs/demo", help="folder for the data and the comparison (default: runs/demo)"
    )
    p.add_argument("--model", default="minilm", help="base model (default: minilm)")
    p.add_argument("--examples", type=int, default=400, help="messages to generate (default: 400)")
    p.add_argument(
        "--methods", type=_comma_list, default=None, help="methods to compare (default: all seven)"
    )
    p.add_argument("--trials", type=int, default=2, help="search trials per method (default: 2)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar shows training; loading bars only clutter the output
    from multitune.config import parse_args

    parser = build_parser()
    try:
        args = parse_args(parser, argv)  # --config FILE: its settings become the defaults of the flags
        func: Callable[[argparse.Namespace], None] = args.func
        func(args)
    except MultituneError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            "interrupted; what was saved is kept (rerun with --resume to continue a training run)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
