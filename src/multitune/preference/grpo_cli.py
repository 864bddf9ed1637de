"""``multitune grpo``: GRPO or RLOO (multitune.preference.grpo) with ``ppo``'s prompts, rewards and run folder."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from multitune.config import plural
from multitune.errors import ConfigError
from multitune.preference.grpo import GRPOConfig, train_grpo
from multitune.preference.ppo_cli import (
    _policy_bank,
    _policy_task,
    _prompts_from_args,
    _reward_fn,
    _reward_source,
    _score_window,
    peak_rss_mb,
    run_config_from_args,
)
from multitune.preference.scoring import trainable_methods
from multitune.trackers import open_trackers, tracked


def add_grpo_arguments(parser: argparse.ArgumentParser) -> None:
    """``ppo``'s flags for the model, prompts, reward and method, and GRPO's own settings."""
    from multitune.flags import add_arguments, add_method_arguments
    from multitune.preference.ppo_cli import add_rollout_arguments

    add_rollout_arguments(
        parser,
        "runs/grpo",
        "folder to write: config.yaml, metrics.jsonl (one line per step), adapter/, result.json "
        "(default: runs/grpo)",
    )
    add_arguments(parser, GRPOConfig, dest_prefix="grpo.")
    add_method_arguments(parser, trainable_methods())


def grpo_config_from_args(args: argparse.Namespace) -> tuple[GRPOConfig, Any]:
    return run_config_from_args(args, GRPOConfig(), "grpo.")


def cmd_grpo(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune grpo``: the base, the policy task, the reward, GRPO steps, the run folder (as ``ppo``'s, with
    no value head)."""
    from multitune.api import adapter_folder
    from multitune.config import device_problem
    from multitune.flags import command_yaml
    from multitune.preference.cli import run_folder, write_report
    from multitune.preference.rewards import load_python_reward
    from multitune.storage import save_adapter, write_json_atomic

    config, method_config = grpo_config_from_args(args)
    task = _policy_task(args)
    if device_problem(args.device):
        raise ConfigError(device_problem(args.device))
    source = _reward_source(args)
    prompts = _prompts_from_args(args)
    reward_python = load_python_reward(args.reward_python) if args.reward_python else None
    judge = (
        adapter_folder(args.reward_model or args.reward_classifier) if source != "--reward-python" else None
    )
    resolved = {
        "task": task,
        **{f"grpo.{k}": v for k, v in asdict(config).items()},
        **{f"methods.{args.method}.{k}": v for k, v in asdict(method_config).items()},
    }
    out = Path(args.output)
    with run_folder(out, "multitune grpo") as start:
        device = None if args.device == "auto" else args.device
        bank = _policy_bank(args, task, config, method_config, device)  # type: ignore[arg-type]
        reward_fn = _reward_fn(args, source, bank, task, judge, reward_python, config.max_length, device)
        trainable = sum(p.numel() for p in bank.task_parameters(task).values())
        write_metrics = start(command_yaml(args, resolved))
        reward_text = args.reward_model or args.reward_classifier or args.reward_python
        print(
            f"grpo ({config.advantage} advantages, {config.loss} loss): {args.method} policy '{task}' on "
            f"{args.model} ({trainable:,} trainable), {plural(len(prompts), 'prompt')}, {config.group_size} "
            f"responses each, reward {source} {reward_text}, reference: {config.reference}",
            flush=True,
        )

        trackers = open_trackers(config.report_to, out, asdict(config))
        write = tracked(write_metrics, trackers)

        def log(record: dict[str, Any]) -> None:
            write(record)
            tqdm.write(
                f"step {record['step']:>4}/{config.steps}  score {record['score']:8.4f}  spread "
                f"{record['score_std_in_group']:.4f}  kl {record['kl']:7.4f}  entropy {record['entropy']:.3f}",
                file=sys.stdout,
            )

        try:
            result = train_grpo(bank, task, prompts, reward_fn, config, progress=not args.quiet, log=log)
        finally:
            if trackers is not None:
                trackers.close()
        history = result["history"]
        k, first, last = _score_window(history)
        summary = {
            "command": "grpo",
            "task": task,
            "method": args.method,
            "model": args.model,
            "reward": source,
            "reward_source": reward_text,
            "prompts": len(prompts),
            "trainable_parameters": trainable,
            "steps": len(history),
            "score_first": first,
            "score_last": last,
            "kl_last": history[-1]["kl"],
            "seconds": round(result["seconds"], 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "config": asdict(config),
            "method_config": asdict(method_config),
        }
        save_adapter(
            bank, task, out / "adapter", extra={"grpo": {"reward": reward_text, "steps": len(history)}}
        )
        write_json_atomic(out / "result.json", summary)  # last: a folder with result.json is a finished run
        write_report(out, summary, history, [], True)
    print(
        f"grpo done: {plural(len(history), 'step')} in {summary['seconds']:.1f} s; mean score of the first "
        f"{plural(k, 'step')} {first:.4f} -> last {k} {last:.4f}; KL {summary['kl_last']:.4f}"
    )
    print(f"adapter: {out / 'adapter'}")
    return summary
