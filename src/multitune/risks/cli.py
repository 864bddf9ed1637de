"""The risk commands (``multitune audit``): flags, entry points and what they print (the work is in
:mod:`multitune.risks.audit`)."""

from __future__ import annotations

import argparse

from multitune.cli_commands import Command, add_data_file_arguments, columns_of, device_of
from multitune.errors import ConfigError


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder of 'multitune train', or one task's adapter folder")
    add_data_file_arguments(
        parser, "rows to audit (.csv .tsv .json .jsonl .parquet); optional with only --golden",
        data_required=False,
    )  # fmt: skip
    parser.add_argument(
        "--attributes",
        help="comma-separated: gender,nationality,religion,age (default: all, or only --lexicon's pairs)",
    )
    parser.add_argument("--lexicon", help="your own swaps: a CSV/TSV of two columns, term,counterpart")
    parser.add_argument("--language", default="en", help="language of the built-in lexicons: en or it")
    parser.add_argument("--group-column", help="column of groups: accuracy and error rate per group")
    parser.add_argument("--output", help="folder for audit.json and audit.html (default: RUN/audit)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument(
        "--membership", action="store_true",
        help="also the loss-based membership attack: AUC of training rows vs held-out rows (0.5 is no leak)",
    )  # fmt: skip
    parser.add_argument(
        "--members", help="member rows of --membership (default: the training rows the run kept)"
    )
    parser.add_argument(
        "--non-members", help="non-member rows of --membership (default: the run's test split)"
    )
    parser.add_argument(
        "--canaries", action="store_true",
        help="generation: the exposure of the secrets 'multitune train --canaries K' planted",
    )  # fmt: skip
    parser.add_argument(
        "--canary-samples", type=int, default=2000,
        help="sampled secrets each canary is ranked among (default: 2000)",
    )  # fmt: skip
    parser.add_argument(
        "--consistency", action="store_true",
        help="generation: self-consistency of the greedy answer against sampled ones, and its token log-probability",
    )  # fmt: skip
    parser.add_argument(
        "--samples", type=int, default=5, help="answers sampled per prompt by --consistency (default: 5)"
    )
    parser.add_argument(
        "--golden",
        help="score the task on this golden set (inputs with reference outputs): accuracy, or ROUGE-L, exact "
        "match and token F1",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap and the typos (default: 0)"
    )


def cmd_audit(args: argparse.Namespace) -> None:
    from multitune.risks.audit import AuditSettings, audit, invariance_line, parse_attributes, summary_line
    from multitune.risks.lexicons import LANGUAGES

    if args.language not in LANGUAGES:
        raise ConfigError(f"--language '{args.language}' has no lexicon; use {' or '.join(LANGUAGES)}")
    if args.samples < 1 or args.canary_samples < 1:
        raise ConfigError("--samples and --canary-samples must be at least 1")
    if args.resamples < 1:
        raise ConfigError("--resamples must be at least 1")
    if args.data is None and args.golden is None:
        raise ConfigError(
            "audit needs --data FILE (the rows to audit), or --golden FILE to score a golden set"
        )
    if args.data is None and (args.membership or args.canaries or args.consistency or args.group_column):
        raise ConfigError(
            "--membership, --canaries, --consistency and --group-column run with an audit of --data FILE; "
            "pass --data"
        )
    columns = columns_of(args)
    settings = AuditSettings(
        parse_attributes(args.attributes), args.lexicon, args.language, args.group_column, args.resamples,
        args.seed, args.batch_size, args.membership, args.members, args.non_members,
        args.canaries, args.canary_samples, args.consistency, args.samples, args.golden,
    )  # fmt: skip
    report = audit(args.run, args.data, columns, settings, args.output, args.model, device_of(args))
    for name, result in report["attributes"].items():
        print(summary_line(name, result))
    for name, result in report["invariance"].items():
        print(invariance_line(name, result))
    if "groups" in report:
        groups = report["groups"]
        shown = ", ".join(f"{g} {m['accuracy']:.3f}" for g, m in groups["groups"].items())
        print(f"accuracy per group: {shown} (largest difference {groups['accuracy_difference']:.3f})")
    if "membership" in report:
        from multitune.risks.memorisation import membership_line

        print(membership_line(report["membership"]))
    if "canaries" in report:
        from multitune.risks.canaries import canaries_line

        print(canaries_line(report["canaries"]))
    if "consistency" in report:
        from multitune.risks.consistency import consistency_line

        print(consistency_line(report["consistency"]))
    if "golden" in report:
        from multitune.risks.golden import golden_line

        print(golden_line(report["golden"]))
    print(f"report: {report['output']}/audit.html (and audit.json)")


def commands() -> list[Command]:
    return [
        Command(
            "audit",
            "bias audit of a task: counterfactual flips (or response log-probabilities), invariance, metrics per group",
            add_audit_arguments,
            cmd_audit,
        )
    ]
