"""``multitune <command>``: a thin dispatch onto the commands of the feature packages.

User mistakes (:class:`multitune.errors.MultituneError`) print one line, ``error: ...``, and exit 2;
they never show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from multitune.errors import MultituneError


def build_parser() -> argparse.ArgumentParser:
    """Every feature package's commands (its ``cli.commands()``), in the order ``multitune --help`` lists them."""
    from multitune.compare import cli as compare
    from multitune.compose import cli as compose
    from multitune.health import cli as health
    from multitune.health import feedback_cli as feedback
    from multitune.health import update_cli as update
    from multitune.interop import cli as interop
    from multitune.preference import cli as preference
    from multitune.risks import cli as risks
    from multitune.serve import cli as serve
    from multitune.training import cli as training

    parser = argparse.ArgumentParser(prog="multitune", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (training, compare, serve, health, update, feedback, risks, compose, preference, interop):
        for command in module.commands():
            p = subparsers.add_parser(command.name, help=command.help)
            command.add_arguments(p)
            p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar shows training; loading bars only clutter the output
    from multitune.flags import parse_args

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
