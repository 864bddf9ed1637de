"""``multitune ppo``: PPO on a policy adapter with a reward model, a classifier's label or a Python function.

Writes, into a locked output folder, config.yaml (its ``--config`` reads it back) and metrics.jsonl (a line per
step, as it happens) first, then adapter/, the value head and result.json last (a folder with result.json is a
finished run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel
from multitune.config import plural
from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.preference.cli import run_folder, write_report
from multitune.preference.ppo import VALUE_HEAD_FILE, PPOConfig, check_policy, save_value_head, train_ppo
from multitune.preference.rewards import (
    RewardFn,
    load_python_reward,
    reward_from_classifier,
    reward_from_model,
)
from multitune.preference.scoring import trainable_methods
from multitune.trackers import open_trackers, tracked


# ---- CLI -------------------------------------------------------------------------------------------
def add_ppo_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``multitune ppo``: model, prompts, one reward source, method, PPO settings, output."""
    from multitune.flags import add_arguments, add_method_arguments

    add_rollout_arguments(
        parser,
        "runs/ppo",
        "folder to write: config.yaml, metrics.jsonl (one line per step), adapter/, value_head.safetensors, "
        "result.json (default: runs/ppo)",
    )
    add_arguments(parser, PPOConfig, dest_prefix="ppo.")
    add_method_arguments(parser, trainable_methods())


def add_rollout_arguments(parser: argparse.ArgumentParser, output: str, output_help: str) -> None:
    """The flags ``ppo`` and ``grpo`` share: model, prompts, one reward source, the policy's task and method."""
    from multitune.cli_commands import add_quantize_argument
    from multitune.config import DEVICE_HELP
    from multitune.flags import add_config_argument

    add_config_argument(parser)
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="base model: short name, HF folder or .gguf (default: smollm2-135m)",
    )
    add_quantize_argument(parser)
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
    parser.add_argument("--output", default=output, help=output_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar (step lines are still printed)")


def ppo_config_from_args(args: argparse.Namespace) -> tuple[PPOConfig, Any]:
    """(PPOConfig, the method's config) from the flags that were given."""
    return run_config_from_args(args, PPOConfig(), "ppo.")


C = TypeVar("C", bound=Any)


def run_config_from_args(args: argparse.Namespace, defaults: C, prefix: str) -> tuple[C, Any]:
    """(the run's settings: ``defaults`` with the given ``PREFIX.field`` flags, the method's config), checked."""
    values = vars(args)
    given = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix) and v is not None}
    config = dataclasses.replace(defaults, **given)
    if args.method not in METHODS:
        raise ConfigError(f"unknown method '{args.method}'; choose one of: {', '.join(sorted(METHODS))}")
    methods = f"methods.{args.method}."
    method_values = {
        k[len(methods) :]: v for k, v in values.items() if k.startswith(methods) and v is not None
    }
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
    same = same and meta.get("base_quantize") == policy.base.quantize
    quantize = meta.get("base_quantize")
    bank = policy if same else MultiTaskModel(load_base(meta["base_model"], device=device, quantize=quantize))
    name = "reward" if "reward" not in bank.tasks else "reward-judge"
    load_adapter(bank, folder, name)
    return bank, name


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _policy_task(args: argparse.Namespace) -> str:
    """The policy's task name (``--task`` or the output folder's name), checked before anything loads: it
    names the adapter that is saved last, so a bad one must not cost a whole run."""
    from multitune.config import TASK_NAME, task_name_from_folder

    task: str = args.task or task_name_from_folder(args.output)
    if not TASK_NAME.fullmatch(task):
        raise ConfigError(
            f"task name '{task}' must be letters, digits, _ and - (at most 64, starting with a letter "
            "or digit); fix --task"
        )
    return task


def _prompts_from_args(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompts``, cut to ``--max-prompts``; refused when none are left, since a PPO step
    needs at least one rollout."""
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
    return prompts


def _policy_bank(
    args: argparse.Namespace, task: str, config: PPOConfig, method_config: Any, device: str | None
) -> MultiTaskModel:
    """The base with the policy task on it. Seeded after loading the base and before adding the task, so that
    the policy's initial weights depend on ``--seed`` alone."""
    from multitune.models import load_base

    base = load_base(args.model, device=device, quantize=args.quantize)
    torch.manual_seed(config.seed)
    bank = MultiTaskModel(base)
    bank.add_task(task, "generation", args.method, method_config)
    check_policy(bank, task, config)
    return bank


def _reward_fn(
    args: argparse.Namespace,
    source: str,
    policy: MultiTaskModel,
    task: str,
    judge_folder: Path | None,
    reward_python: RewardFn | None,
    max_length: int,
    device: str | None,
) -> RewardFn:
    """The reward of the one source given: a reward model's score or a classifier's label probability (the
    judge loaded beside the policy when it can share its base), or the Python function loaded up front."""
    if judge_folder is None:
        assert reward_python is not None  # _reward_source guarantees exactly one source
        return reward_python
    judge, judge_task = _judge_bank(policy, task, judge_folder, args.model, device)
    if source == "--reward-model":
        return reward_from_model(judge, judge_task, max_length=max_length)
    return reward_from_classifier(
        judge,
        judge_task,
        args.reward_label,
        args.reward_include_prompt,
        max_length=max_length,
    )


def _step_logger(
    write_metrics: Callable[[dict[str, Any]], None], steps: int
) -> Callable[[dict[str, Any]], None]:
    """``log(record)`` for train_ppo: each step goes to metrics.jsonl as it happens and as a line above the
    progress bar (tqdm.write, so the bar is not broken)."""

    def log(record: dict[str, Any]) -> None:
        write_metrics(record)
        tqdm.write(
            f"step {record['step']:>4}/{steps}  score {record['score']:8.4f}  reward "
            f"{record['reward']:8.4f}  kl {record['kl']:7.4f}  kl_coef {record['kl_coef']:.4f}  "
            f"entropy {record['entropy']:.3f}  clip {record['clip_fraction']:.3f}",
            file=sys.stdout,
        )
        sys.stdout.flush()

    return log


def _score_window(history: list[dict[str, Any]]) -> tuple[int, float, float]:
    """(k, mean score of the first k steps, of the last k): the run's before and after, smoothed over up to
    five steps and at most a third of the run, so that the two windows do not overlap (a one-step run compares
    its step with itself)."""
    k = max(1, min(5, len(history) // 3))
    first, last = (sum(r["score"] for r in part) / len(part) for part in (history[:k], history[-k:]))
    return k, first, last


def _save_ppo_outputs(
    bank: MultiTaskModel,
    task: str,
    out: Path,
    value_head: torch.nn.Linear,
    reward_text: str,
    summary: dict[str, Any],
) -> None:
    """adapter/, the value head, then result.json: each written atomically, result.json last, since a folder
    with result.json is a finished run."""
    from multitune.storage import publish_mode, save_adapter, write_json_atomic

    save_adapter(
        bank, task, out / "adapter", extra={"ppo": {"reward": reward_text, "steps": summary["steps"]}}
    )
    partial = out / f".{VALUE_HEAD_FILE}.tmp-{os.getpid()}"  # a name the lock's clean-up knows as stale
    save_value_head(value_head, partial)
    publish_mode(partial)  # safetensors writes 0600: the umask's mode, as every other file of the run
    os.replace(partial, out / VALUE_HEAD_FILE)
    write_json_atomic(out / "result.json", summary)  # last: a folder with result.json is a finished run


def cmd_ppo(args: argparse.Namespace) -> None:
    """``multitune ppo``: load the base, add the policy task, build the reward, run PPO, save everything.

    The run folder is written as ``multitune train`` writes one: config.yaml (the settings, which
    ``--config`` reads back) and metrics.jsonl (a line per step, as it happens) first, then adapter/, the
    value head and, last, result.json.
    """
    from multitune.api import adapter_folder
    from multitune.config import device_problem
    from multitune.flags import command_yaml

    config, method_config = ppo_config_from_args(args)
    task = _policy_task(args)
    if device_problem(args.device):
        raise ConfigError(device_problem(args.device))
    source = _reward_source(args)
    prompts = _prompts_from_args(args)
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
        bank = _policy_bank(args, task, config, method_config, device)
        reward_fn = _reward_fn(
            args, source, bank, task, judge_folder, reward_python, config.max_length, device
        )
        trainable = sum(p.numel() for p in bank.task_parameters(task).values())
        write_metrics = start(command_yaml(args, resolved))
        reward_text = args.reward_model or args.reward_classifier or args.reward_python
        print(
            f"ppo: {args.method} policy '{task}' on {args.model} ({trainable:,} trainable + value head), "
            f"{plural(len(prompts), 'prompt')}, reward {source} {reward_text}, "
            f"reference: {config.reference}",
            flush=True,
        )
        trackers = open_trackers(config.report_to, out, asdict(config))
        log = _step_logger(tracked(write_metrics, trackers), config.steps)
        try:
            result = train_ppo(bank, task, prompts, reward_fn, config, progress=not args.quiet, log=log)
        finally:
            if trackers is not None:
                trackers.close()
        history = result["history"]
        k, first, last = _score_window(history)
        summary = {
            "command": "ppo",
            "task": task,
            "method": args.method,
            "model": args.model,
            "quantize": args.quantize,
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
        _save_ppo_outputs(bank, task, out, result["value_head"], reward_text, summary)
        write_report(out, summary, history, [], True)
    print(
        f"ppo done: {plural(len(history), 'step')} in {summary['seconds']:.1f} s; mean score of the first "
        f"{plural(k, 'step')} {first:.4f} -> last {k} {last:.4f}; KL {summary['kl_last']:.3f} (kl_coef {result['kl_coef']:.4f}); "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB"
    )
    print(f"adapter: {out / 'adapter'} (value head: {out / VALUE_HEAD_FILE})")
