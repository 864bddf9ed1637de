"""``multitune compare``, ``demo`` and ``methods``: flags and entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multitune.cli_commands import Command
from multitune.errors import ConfigError


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
        seeds=args.seeds,
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
        general_data=args.general_data,
        audit=args.audit,
        audit_attributes=_comma_list(args.audit_attributes) if args.audit_attributes is not None else None,
        audit_language=args.audit_language,
        merge_with=_comma_list(args.merge_with) if args.merge_with else [],
        merge_method=args.merge_method,
        search_dora=args.search_dora,
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
    from multitune.compare.table import Row, has_seeds

    metric = results[0]["metric"]
    seeds = has_seeds([Row(r, metric) for r in results])
    print(
        f"\n{'method':<10} {'trainable':>12} {'stored':>10} {'train s':>8} {'ms/ex':>7}  test {metric} [95% CI]"
        + ("; over seeds: mean ± std (min–max)" if seeds else "")
    )
    for r in results:
        row = Row(r, metric)
        test = " ".join(
            p for p in row.parts()["test"] if p
        )  # 'did not learn (scored 0.500)' for a non-learner
        if seeds:
            main, detail = row.parts()["seeds"]
            test += f"; {main}" + (f" ({detail})" if detail else "")
        stored = r["stored_bytes"] / 1e6
        print(
            f"{r['method']:<10} {r['trainable_parameters']:>12,} {stored:>8.2f}MB {r['train_seconds']:>8.1f} "
            f"{(r.get('latency_ms') or 0):>7.1f}  {test}"
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


def _comma_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from multitune.compare.settings import default_methods
    from multitune.config import DataConfig, TrainConfig
    from multitune.flags import add_arguments, add_config_argument, add_method_arguments

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
        "--seeds",
        type=int,
        default=1,
        help="train each method's chosen settings with this many seeds (--seed, --seed + 1, ...) and report "
        "the test metric's mean and spread over them (default: 1, the final run alone)",
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
    p.add_argument(
        "--general-data",
        metavar="FILE",
        help="generation: the general text each method's perplexity is measured on (how much general ability "
        "it kept), one paragraph per line or blank-line separated block, or a table with a 'text' column "
        "(default: a built-in sample of 40 paragraphs)",
    )
    p.add_argument(
        "--audit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after each method's final run, the counterfactual bias audit of its task on the test split "
        "(as `multitune audit`): the flip rate per attribute, with its 95 per cent interval, in the report "
        "(default: off)",
    )
    p.add_argument(
        "--audit-attributes",
        metavar="LIST",
        help="with --audit: comma-separated attributes to swap, gender,nationality,religion,age (default: all)",
    )
    p.add_argument(
        "--audit-language",
        default="en",
        help="with --audit: language of the swap lexicons, en or it (default: en)",
    )
    p.add_argument(
        "--merge-with",
        help="with --methods ...,merged: run or adapter folders of other LoRA tasks of this base (comma-separated) "
        "that the comparison's LoRA task is merged with; the merged row is judged in the same table",
    )
    p.add_argument(
        "--merge-method",
        default="ties",
        help="how --methods merged merges (multitune merge --method; default: ties)",
    )
    p.add_argument(
        "--search-dora",
        action="store_true",
        help="LoRA's search also chooses between plain LoRA and DoRA (use_dora) on the validation split; the "
        "row says which won (default: LoRA's use_dora as set, off)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (trial lines are still printed)")
    add_arguments(p, DataConfig, dest_prefix="data.")
    add_arguments(p, TrainConfig, dest_prefix="train.")
    add_method_arguments(p)


def add_methods_arguments(p: argparse.ArgumentParser) -> None:
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


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output", default="runs/demo", help="folder for the data and the comparison (default: runs/demo)"
    )
    p.add_argument("--model", default="minilm", help="base model (default: minilm)")
    p.add_argument("--examples", type=int, default=400, help="messages to generate (default: 400)")
    p.add_argument(
        "--methods",
        type=_comma_list,
        default=None,
        help="methods to compare (default: every compared method)",
    )
    p.add_argument("--trials", type=int, default=2, help="search trials per method (default: 2)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def commands() -> list[Command]:
    return [
        Command(
            "compare",
            "search, train and test several methods on your data; write a report",
            _add_compare_arguments,
            cmd_compare,
        ),
        Command(
            "methods",
            "list the methods, their settings and their cost on a model",
            add_methods_arguments,
            cmd_methods,
        ),
        Command(
            "demo",
            "compare every method on a generated task, with a report (minutes on CPU)",
            add_demo_arguments,
            cmd_demo,
        ),
    ]
