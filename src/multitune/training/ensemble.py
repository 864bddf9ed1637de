"""Prompt ensembling (Lester et al. 2021, section 6): N soft prompts of one task, one batch, majority vote.

The members are ordinary prompt-tuned tasks of one bank (``{task}-e0``, ``{task}-e1``, ...) trained from
different seeds. Because the bank routes every row to its own prompt, evaluating the ensemble costs one
batch of N x B rows through one frozen model, not N models: the point of the paper's section.

``multitune ensemble`` (:func:`run_ensemble`) is the whole job, and writes a run folder that ``multitune
eval`` and ``multitune predict`` answer with the vote::

    RUN/config.yaml, metrics.jsonl (each member's evaluations), result.json (the vote and each member)
    RUN/ensemble.json            {"format": "multitune-prompt-ensemble", "members": [...], "base_model": ...}
    RUN/members/TASK-eI/         one ordinary adapter folder per member (``multitune serve RUN/members``)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.config import RunConfig, TrainConfig, to_yaml
from multitune.data import Example
from multitune.encode import collate, encode_example, to_device
from multitune.errors import ConfigError
from multitune.methods.prompt import PromptConfig
from multitune.metrics import classification_metrics
from multitune.training.train import train


def member_names(task: str, n: int) -> list[str]:
    return [f"{task}-e{i}" for i in range(n)]


def train_prompt_ensemble(
    bank: MultiTaskModel,
    task: str,
    n: int,
    labels: list[str],
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    config: TrainConfig,
    prompt: PromptConfig | None = None,
    progress: bool = False,
    on_eval: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[str]:
    """Add and train ``n`` prompt-tuned members of a classification task, member i with seed ``seed + i``.

    ``on_eval(member, record)`` is called after each validation of each member.
    """
    if n < 1:
        raise ConfigError(f"an ensemble needs at least 1 member (got {n})")
    members = member_names(task, n)
    for i, member in enumerate(members):
        torch.manual_seed(config.seed + i)  # the prompt's initialisation
        bank.add_task(member, "classification", "prompt", prompt or PromptConfig(), labels)
        train(
            bank,
            member,
            train_examples,
            validation_examples,
            dataclasses.replace(config, seed=config.seed + i),
            progress=progress,
            desc=f"train {member} ({i + 1}/{n})",
            on_eval=None if on_eval is None else functools.partial(on_eval, member),
        )
    return members


def _check(bank: MultiTaskModel, members: Sequence[str]) -> list[str]:
    if not members:
        raise ConfigError("an ensemble needs at least one member task")
    labels = None
    for member in members:
        spec = bank.tasks.get(member)
        if spec is None:
            raise ConfigError(
                f"unknown ensemble member '{member}'; tasks in this bank: {', '.join(bank.tasks) or 'none'}"
            )
        if spec.kind != "classification":
            raise ConfigError(
                f"ensemble member '{member}' is a {spec.kind} task; majority vote needs classification"
            )
        if labels is not None and spec.labels != labels:
            raise ConfigError(
                f"ensemble member '{member}' has labels {spec.labels[:5]}, not {labels[:5]}: "
                "members must be trained on the same task"
            )
        labels = spec.labels
    return list(labels or [])


@torch.no_grad()
def ensemble_votes(
    bank: MultiTaskModel,
    members: Sequence[str],
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's predicted class (E, N) and probabilities (E, N, C), every example's N rows in one batch."""
    labels = _check(bank, members)
    spec = bank.tasks[members[0]]
    slots = [bank.slots.index(m) for m in members]
    pad = bank.base.tokenizer.pad_token_id
    was_training = bank.training
    bank.eval()
    per_batch = max(1, batch_size // len(members))
    probs = []
    for start in range(0, len(examples), per_batch):
        chunk = examples[start : start + per_batch]
        features = [encode_example(bank.base, spec, ex, max_length) for ex in chunk]
        repeated = [f for f in features for _ in members]  # example-major: rows e*N .. e*N + N-1
        batch = to_device(collate(repeated, pad, slots * len(chunk)), bank.base.device)
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        p = torch.softmax(logits[:, : len(labels)].float(), dim=-1)
        probs.append(p.view(len(chunk), len(members), len(labels)).cpu())
    bank.train(was_training)
    stacked = torch.cat(probs) if probs else torch.empty(0, len(members), len(labels))
    return stacked.argmax(-1), stacked


def majority_vote(votes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The most voted class per example; a tie goes to the tied class with the highest mean probability."""
    counts = torch.nn.functional.one_hot(votes, probs.shape[-1]).sum(1).float()  # (E, C)
    tie_break = probs.mean(1) * 1e-3  # < one vote: only decides between equal counts
    return (counts + tie_break).argmax(-1)


def ensemble_predict(
    bank: MultiTaskModel,
    members: Sequence[str],
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 64,
) -> list[str]:
    return [label for label, _ in ensemble_predictions(bank, members, examples, max_length, batch_size)]


def ensemble_predictions(
    bank: MultiTaskModel,
    members: Sequence[str],
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 64,
) -> list[tuple[str, float]]:
    """(the voted label, the share of members that voted for it) of each example."""
    labels = _check(bank, members)
    votes, probs = ensemble_votes(bank, members, examples, max_length, batch_size)
    winners = majority_vote(votes, probs)
    agreement = (votes == winners[:, None]).float().mean(1)
    return [
        (labels[w], round(float(a), 6)) for w, a in zip(winners.tolist(), agreement.tolist(), strict=True)
    ]


def evaluate_ensemble(
    bank: MultiTaskModel,
    members: Sequence[str],
    examples: Sequence[Example],
    max_length: int = 128,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of the vote, and of each member alone (from the same forward)."""
    labels = _check(bank, members)
    votes, probs = ensemble_votes(bank, members, examples, max_length, batch_size)
    references = [ex.label or "" for ex in examples]
    vote = [labels[i] for i in majority_vote(votes, probs).tolist()]
    result: dict[str, Any] = dict(classification_metrics(vote, references, labels))
    result["members"] = {
        m: classification_metrics([labels[i] for i in votes[:, j].tolist()], references, labels)
        for j, m in enumerate(members)
    }
    return result


# ---- the job behind `multitune ensemble` and its run folder -------------------------------------------------
ENSEMBLE_FILE = "ensemble.json"
FORMAT = "multitune-prompt-ensemble"
MEMBERS = "members"


def is_ensemble(folder: str | Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def run_ensemble(
    config: RunConfig, members: int, progress: bool = True, settings: str | None = None
) -> dict[str, Any]:
    """Data -> base -> ``members`` prompt-tuned tasks (seeds seed .. seed + members - 1) -> the test split
    scored by the vote and by each member -> the run folder of the module docstring. ``settings``: the
    config.yaml to write (default: ``to_yaml(config)``). Returns the summary written to result.json."""
    from multitune.models import load_base
    from multitune.storage import output_lock, save_adapter, write_json_atomic

    if members < 1:
        raise ConfigError(f"an ensemble needs at least 1 member (got {members}); fix --members")
    if config.kind != "classification":
        raise ConfigError("a prompt ensemble votes on labels: it needs a classification task")
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; choose another --output")
    with output_lock(out, "multitune ensemble"):
        if any(out.iterdir()):
            raise ConfigError(f"output folder {out} already exists; choose another --output or remove it")
        splits = config.data.splits("classification")  # the user's file first: it fails fast
        device = None if config.train.device == "auto" else config.train.device
        base = load_base(config.model, device=device, quantize=config.train.quantize)
        bank = MultiTaskModel(base)
        (out / "config.yaml").write_text(settings if settings is not None else to_yaml(config))
        (out / "metrics.jsonl").write_text("")

        def log(member: str, record: dict[str, Any]) -> None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"member": member, **record}) + "\n")

        names = train_prompt_ensemble(
            bank,
            config.task_name,
            members,
            splits.labels,
            splits.train,
            splits.validation,
            config.train,
            config.methods.get("prompt"),
            progress,
            log,
        )
        test = evaluate_ensemble(
            bank, names, splits.test, config.train.max_length, config.train.eval_batch_size
        )
        for name in names:
            save_adapter(
                bank, name, out / MEMBERS / name, extra={"ensemble": {"task": config.task, "members": names}}
            )
        meta = {
            "format": FORMAT,
            "version": 1,
            "task": config.task,
            "members": names,
            "labels": splits.labels,
            "base_model": bank.base.source,
            **({"base_quantize": bank.base.quantize} if bank.base.quantize else {}),
            "max_length": config.train.max_length,
        }
        write_json_atomic(out / ENSEMBLE_FILE, meta)
        summary = {
            "task": config.task,
            "method": "prompt",
            "members": names,
            "model": config.model,
            "examples": {
                "train": len(splits.train),
                "validation": len(splits.validation),
                "test": len(splits.test),
            },
            "trainable_parameters": sum(p.numel() for n in names for p in bank.task_parameters(n).values()),
            "test": {k: v for k, v in test.items() if k != "members"},
            "test_members": test["members"],
        }
        write_json_atomic(out / "result.json", summary)  # last: a folder with result.json is a finished run
    return summary


def load_ensemble(
    folder: str | Path, model: str | None = None, device: str | None = None
) -> tuple[MultiTaskModel, list[str], int]:
    """(bank holding every member, the member task names, max_length) of an ensemble run folder."""
    from multitune.models import load_base
    from multitune.storage import load_adapter

    folder = Path(folder)
    try:
        meta = json.loads((folder / ENSEMBLE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"cannot read {folder / ENSEMBLE_FILE} ({error}); is {folder} an ensemble run?"
        ) from error
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("members"), list)
    ):
        raise ConfigError(
            f"{folder / ENSEMBLE_FILE} is not a multitune prompt ensemble (written by 'multitune ensemble')"
        )
    bank = MultiTaskModel(
        load_base(model or meta["base_model"], device=device, quantize=meta.get("base_quantize"))
    )
    for name in meta["members"]:
        load_adapter(bank, folder / MEMBERS / str(name), str(name))
    return bank, [str(n) for n in meta["members"]], int(meta.get("max_length", 128))


# ---- CLI ----------------------------------------------------------------------------------------------
def add_ensemble_arguments(parser: Any) -> None:
    """Flags of ``multitune ensemble``: those of ``multitune train`` for a prompt-tuned classification task,
    plus the number of members."""
    from multitune.config import DataConfig
    from multitune.flags import add_arguments, add_config_argument, add_method_arguments

    add_config_argument(parser)
    parser.add_argument(
        "--members",
        type=int,
        default=5,
        help="soft prompts to train, member i with seed --seed + i (default: 5)",
    )
    parser.add_argument(
        "--model",
        default="minilm",
        help="short name (minilm, smollm2-135m), HF folder or .gguf (default: minilm)",
    )
    parser.add_argument(
        "--task",
        help="task name: letters, digits, _ and -; the members are TASK-e0, TASK-e1, ... "
        "(default: the --output folder's name)",
    )
    parser.add_argument(
        "--output",
        default="runs/ensemble",
        help="run folder: config.yaml, metrics.jsonl, "
        "ensemble.json, members/, result.json (default: runs/ensemble)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(parser, DataConfig, dest_prefix="data.")
    add_arguments(parser, TrainConfig, dest_prefix="train.")
    add_method_arguments(parser, ["prompt"])


def cmd_ensemble(args: Any) -> dict[str, Any]:
    """``multitune ensemble``: train the members, score the vote on the test split, write the run folder."""
    import argparse

    from multitune.config import plural
    from multitune.flags import command_yaml, load_run_config, run_config_values

    config = load_run_config(argparse.Namespace(**vars(args), method="prompt", kind="classification"))
    summary = run_ensemble(
        config, args.members, progress=not args.quiet, settings=command_yaml(args, run_config_values(config))
    )
    test, n = summary["test"], summary["examples"]["test"]
    print(
        f"trained a prompt ensemble of {plural(len(summary['members']), 'member')} for '{config.task}' on "
        f"{config.model}: {plural(summary['trainable_parameters'], 'trainable parameter')} in all"
    )
    print(
        f"test ({plural(n, 'example')}): majority vote accuracy {test['accuracy']:.4f}, macro-F1 "
        f"{test['macro_f1']:.4f}; members: "
        + ", ".join(f"{m} {r['accuracy']:.4f}" for m, r in summary["test_members"].items())
    )
    print(
        f"ensemble: {config.output} (multitune eval/predict {config.output} vote; the members alone: "
        f"{Path(config.output) / MEMBERS})"
    )
    return summary
