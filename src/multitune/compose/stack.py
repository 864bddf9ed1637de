"""Stacking: a task whose rows run on top of a frozen component task (``train --stack-on RUN``).

MAD-X's idea (Pfeiffer et al. 2020, "MAD-X: An Adapter-Based Framework for Multi-Task Cross-Lingual
Transfer", section 2): adapt the base to a domain or language with one adapter on raw text, freeze it, and
train the task's adapter above it. Here any task of the bank can be the component and any parameter
method can sit on it, as the methods coexist on a layer: LoRA deltas add (W x + s_D B_D A_D x + s_T B_T
A_T x), (IA)^3 scales multiply, bottleneck adapters chain (the task's reads the component's output, its task
norms start from the component's), soft prompts and prefixes concatenate (the component's first). Full
fine-tuning and prompting are refused: one replaces the base the component was trained on, the other has
no parameters to sit anywhere. DoRA is refused: its magnitude renormalises the whole weight, so a DoRA
task's update is not defined on top of another's.

The mechanism is the hooks' own (:meth:`multitune.routing.Routing.chain` and the levels of
:mod:`multitune.methods.stack`): a stacked task is one task to the bank, trained, mixed with any other
task in one batch, saved and served as one; the peft package stacks adapters only by activating several
of one model's adapters for the whole batch, never per row.

On disk a stacked task's adapter holds only its own tensors; its ``adapter.json`` refers to the component::

    "stack_on": {"task": "sms-domain", "folder": "/abs/runs/sms-domain/adapter",
                 "relative": "../../sms-domain/adapter", "sha256": "<the component's adapter.safetensors>"}

Loading it loads the component first (found by ``relative`` from the stacked adapter's folder, else by
``folder``; its weights must have the recorded digest), or reuses the bank's task of that name when that
task was loaded from the same weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel


def stackable(method: str) -> bool:
    """Whether a task of ``method`` can be a component or sit on one: its parameters hook into the forward."""
    m = get_method(method)
    return not m.changes_base and m.fit is None and m.score is None and m.render is None


def stackable_methods() -> str:
    return ", ".join(sorted(n for n in METHODS if stackable(n)))


def check_stack(bank: MultiTaskModel, name: str, method: str, config: Any, on: str) -> None:
    """Refuse a stack that cannot run: an unknown component, a method that cannot be stacked, DoRA."""
    if on not in bank.tasks:
        known = ", ".join(bank.tasks) or "none"
        raise ConfigError(
            f"task '{name}' is to be stacked on '{on}', which is not in the bank (tasks: {known})"
        )
    for task, task_method, cfg in (
        (name, method, config),
        (on, bank.tasks[on].method, bank.tasks[on].config),
    ):
        if not stackable(task_method):
            raise ConfigError(
                f"task '{task}' uses {task_method}, which cannot be part of a stack (its parameters do not sit "
                f"on a layer beside another task's); stack tasks of {stackable_methods()}"
            )
        dora = cfg.get("use_dora") if isinstance(cfg, dict) else getattr(cfg, "use_dora", False)
        if dora:
            raise ConfigError(
                f"task '{task}' uses DoRA, whose magnitude renormalises the whole weight, so it has no meaning "
                "on top of another task or under one; stack plain LoRA (drop --lora-use-dora)"
            )


def digest(folder: str | Path) -> str:
    """The sha256 of an adapter folder's weights file: what a stacked task records of its component."""
    from multitune.storage import WEIGHTS_FILE

    path = Path(folder) / WEIGHTS_FILE
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from error
    return hasher.hexdigest()


def reference(bank: MultiTaskModel, task: str, folder: Path) -> dict[str, Any]:
    """The ``stack_on`` record of a stacked ``task`` saved into ``folder``: where its component's adapter is."""
    on = bank.tasks[task].stack_on
    assert on is not None  # internal invariant: only stacked tasks are referenced
    source = bank.loaded_from.get(on)
    if source is None:
        raise ConfigError(
            f"task '{task}' is stacked on '{on}', which was not loaded from an adapter folder; save '{on}' "
            "first (multitune train) and stack on its run folder"
        )
    where, sha = source
    return {
        "task": on,
        "folder": str(where.resolve()),
        "relative": os.path.relpath(where.resolve(), folder.resolve()),
        "sha256": sha,
    }


def reference_problems(meta: dict[str, Any]) -> list[str]:
    """What is wrong with an adapter document's ``stack_on`` record and ``task.stack_on`` (empty: a plain task,
    or a stacked one whose component can be looked for)."""
    task = meta.get("task")
    named = task.get("stack_on") if isinstance(task, dict) else None
    if "stack_on" not in meta:
        return [] if named is None else ["field 'task.stack_on' names a component but 'stack_on' is missing"]
    record = meta["stack_on"]
    if not isinstance(record, dict):
        return ["field 'stack_on' is not a mapping"]
    wrong = [k for k in ("task", "folder", "relative", "sha256") if not isinstance(record.get(k), str)]
    return [f"field(s) {', '.join('stack_on.' + k for k in wrong)} missing or not strings"] if wrong else []


def load_component(bank: MultiTaskModel, record: dict[str, Any], folder: Path, task: str) -> str:
    """Make sure the component a stacked adapter in ``folder`` refers to is in the bank; its bank name.

    Its folder is looked up relative to ``folder`` first (the two runs moved together), then by its
    absolute path; its weights must be the ones the stacked task was trained on."""
    from multitune.storage import load_adapter

    on, sha = record["task"], record["sha256"]
    candidates = [(folder / record["relative"]).resolve(), Path(record["folder"])]
    found = next((c for c in candidates if c.is_dir()), None)
    if on in bank.tasks:
        loaded = bank.loaded_from.get(on)
        if loaded is not None and loaded[1] == sha:
            return on
        raise ConfigError(
            f"task '{task}' is stacked on a task '{on}', and the bank already holds another task of that name "
            f"(other weights); load '{on}' under another name, or load '{task}' into a bank without it"
        )
    if found is None:
        raise ConfigError(
            f"task '{task}' ({folder}) is stacked on '{on}', whose adapter {record['folder']} is missing; restore "
            f"that run folder beside it, or train '{task}' again with --stack-on"
        )
    actual = digest(found)
    if actual != sha:
        raise ConfigError(
            f"task '{task}' was trained on '{on}' as it was saved then, but {found} has other weights now "
            f"(sha256 {actual[:12]}, recorded {sha[:12]}); restore the weights it was trained on, or train "
            f"'{task}' again with --stack-on"
        )
    load_adapter(bank, found, on)
    return on


def stack_on_run(bank: MultiTaskModel, run: str | Path, task: str) -> str:
    """Load the component a new task is trained on (``--stack-on RUN``: a run, task root or adapter folder)
    into ``bank``; its bank name (the component's own task name)."""
    from multitune.health.versions import current_adapter
    from multitune.storage import load_adapter, read_adapter_config

    folder = current_adapter(run)
    if folder is None:
        raise ConfigError(
            f"--stack-on {run}: not a run folder of 'multitune train' (no adapter/adapter.json); give the "
            "--output folder of the run to build on"
        )
    name = read_adapter_config(folder)["task"]["name"]
    if name == task:
        raise ConfigError(
            f"the task to train and the one under it (--stack-on {run}) are both called '{task}'; pass "
            "--task with another name"
        )
    return load_adapter(bank, folder, name).name


def flatten_lora(bank: MultiTaskModel, task: str, name: str) -> str:
    """Add ``name``: one plain LoRA task equal to the stacked LoRA ``task`` over its LoRA components (their
    factors concatenated along the rank, each scale folded into its A: exact, rank = the sum of ranks; the
    :func:`multitune.compose.merge.merge_lora` cat with weights 1), with ``task``'s head. What ``export-peft``
    writes for a stack, the one kind of stack a single PEFT adapter can hold."""
    from multitune.compose.merge import Constituent, MergeSettings, merge_lora
    from multitune.methods.lora import LoRAConfig

    chain = bank.routing.chain(task)
    methods = sorted({bank.tasks[t].method for t in chain} - {"base"})
    if methods != ["lora"]:
        raise ConfigError(
            f"task '{task}' is a stack of {' on '.join(bank.tasks[t].method for t in reversed(chain))}; a PEFT "
            "adapter holds one method, so only a stack of LoRA tasks exports (as one LoRA, ranks concatenated)"
        )
    members = [
        Constituent(t, Path("."), {"task": bank.tasks[t].to_json()}, bank.task_state_dict(t))
        for t in chain
        if bank.tasks[t].method == "lora"
    ]
    body, config, _ = merge_lora(members, MergeSettings(method="cat"))
    spec = bank.tasks[task]
    bank.add_task(name, spec.kind, "lora", LoRAConfig(**config), spec.labels, spec.pooling)
    head = {k: v for k, v in bank.task_state_dict(task).items() if k.startswith("head.")}
    bank.load_task_state_dict(name, {**body, **head})
    return name
