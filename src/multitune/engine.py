"""Serve many tasks through one API: a shared frozen base for every adapter method, a group of its own
for each fully fine-tuned task.

Requests are ``(task, input)`` pairs in any order. The engine groups them by model: every row of a task on
the shared base goes into one mixed forward (each row routed to its task), and the rows of a fully
fine-tuned task, which owns a copy of the base, go into that copy's forward. Results come back in request
order. Tasks are loaded and removed at run time without touching the others.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.models import Base, load_base
from multitune.storage import CONFIG_FILE, load_adapter, read_adapter_config

Request = tuple[str, "str | Example"]


class Engine:
    """Tasks of every method behind one ``classify`` / ``generate``."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.shared = MultiTaskModel(base)
        self.groups: dict[str, MultiTaskModel] = {}  # fully fine-tuned task -> its own bank (model copy)
        self.sources: dict[str, str] = {}  # task -> the adapter folder it was loaded from
        # Fast tokenizers must not be used from two threads at once (a server tokenizes requests while
        # its worker encodes a batch): every encoding here holds this lock.
        self.tokenizer_lock = threading.Lock()

    # ---- tasks -------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, model: str | None = None, device: str | None = None) -> Engine:
        """Every adapter folder under ``folder`` (a bank folder: ``FOLDER/TASK/adapter.json``)."""
        folder = Path(folder)
        adapters = sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}"))
        if not adapters:
            raise ConfigError(f"{folder} holds no adapter folders (*/{CONFIG_FILE}); give a bank folder")
        source = model or read_adapter_config(adapters[0])["base_model"]
        engine = cls(load_base(source, device=device))
        for adapter in adapters:
            engine.load(adapter)
        return engine

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return {**self.shared.tasks, **{name: bank.tasks[name] for name, bank in self.groups.items()}}

    def load(self, folder: str | Path, name: str | None = None) -> TaskSpec:
        """Add the task saved in an adapter folder (a fully fine-tuned one gets a fresh copy of the base)."""
        meta = read_adapter_config(folder)
        task = name or meta["task"]["name"]
        if task in self.tasks:
            raise ConfigError(f"task '{task}' is already served; remove it first or load it under another name")
        if get_method(meta["task"]["method"]).changes_base:
            bank = MultiTaskModel(self._base_copy())
            spec = load_adapter(bank, folder, task)
            self.groups[task] = bank
        else:
            spec = load_adapter(self.shared, folder, task)
        self.sources[task] = str(folder)
        return spec

    def _base_copy(self) -> Base:
        try:
            return load_base(self.base.source, device=str(self.base.device))
        except ConfigError as error:
            raise ConfigError(f"a fully fine-tuned task needs its own copy of the base, and {self.base.source!r} "
                              f"cannot be loaded again ({error}); serve from a model folder, file or short name") from error

    def remove(self, task: str) -> None:
        if task in self.groups:
            del self.groups[task]
        elif task in self.shared.tasks:
            self.shared.remove_task(task)
        else:
            raise ConfigError(f"unknown task '{task}'; served tasks: {', '.join(self.tasks) or 'none'}")

    def bank_of(self, task: str) -> MultiTaskModel:
        if task in self.groups:
            return self.groups[task]
        if task in self.shared.tasks:
            return self.shared
        raise ConfigError(f"unknown task '{task}'; served tasks: {', '.join(self.tasks) or 'none'}")

    # ---- requests ----------------------------------------------------------------------------------
    def _grouped(self, requests: Sequence[Request], kind: str) -> dict[int, list[int]]:
        """Request indices by bank (keyed by id), checking every task exists and is of ``kind``."""
        groups: dict[int, list[int]] = {}
        for i, (task, _) in enumerate(requests):
            bank = self.bank_of(task)
            if bank.tasks[task].kind != kind:
                raise ConfigError(f"task '{task}' is a {bank.tasks[task].kind} task, not {kind}")
            groups.setdefault(id(bank), []).append(i)
        return groups

    def _features(self, bank: MultiTaskModel, requests: Sequence[Request], rows: list[int], max_length: int,
                  with_target: bool) -> tuple[list[dict[str, Any]], list[int]]:
        """Features and slots of the given requests, in their order (each task's render hook applied)."""
        features: list[dict[str, Any]] = [{}] * len(rows)
        by_task: dict[str, list[int]] = {}
        for position, i in enumerate(rows):
            by_task.setdefault(requests[i][0], []).append(position)
        for task, positions in by_task.items():
            examples = [_example(requests[rows[p]][1]) for p in positions]
            with self.tokenizer_lock:
                encoded = encode_task(bank, task, examples, max_length, with_target)
            for p, feature in zip(positions, encoded, strict=True):
                features[p] = feature
        slots = [bank.slots.index(requests[i][0]) for i in rows]
        return features, slots

    @torch.no_grad()
    def classify(self, requests: Sequence[Request], max_length: int = 128) -> list[dict[str, float]]:
        """Label probabilities of each (task, text): one forward per model, rows of many tasks mixed."""
        out: list[dict[str, float]] = [{}] * len(requests)
        for rows in self._grouped(requests, "classification").values():
            bank = self.bank_of(requests[rows[0]][0])
            bank.eval()
            features, slots = self._features(bank, requests, rows, max_length, True)
            batch = to_device(collate(features, bank.base.tokenizer.pad_token_id, slots), bank.base.device)
            logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
            for row, i in enumerate(rows):
                labels = bank.tasks[requests[i][0]].labels
                probs = torch.softmax(logits[row, : len(labels)].float(), dim=-1).tolist()
                out[i] = dict(zip(labels, probs, strict=True))
        return out

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], max_new_tokens: int = 64, max_length: int = 128,
                 **generate_kwargs: Any) -> list[str]:
        """Completions of each (task, prompt): one ``generate`` per model, rows of many tasks mixed."""
        out = [""] * len(requests)
        generate_kwargs.setdefault("do_sample", False)
        for rows in self._grouped(requests, "generation").values():
            bank = self.bank_of(requests[rows[0]][0])
            bank.eval()
            tokenizer = bank.base.tokenizer
            features, slots = self._features(bank, requests, rows, max_length, False)
            side = "left" if bank.base.arch == "decoder" else "right"
            batch = to_device(collate(features, tokenizer.pad_token_id, slots, padding_side=side), bank.base.device)
            ids = bank.generate(batch["input_ids"], batch["attention_mask"], batch["task_ids"],
                                max_new_tokens=max_new_tokens, **generate_kwargs)
            for row, i in enumerate(rows):
                out[i] = tokenizer.decode(ids[row], skip_special_tokens=True).strip()
        return out


def _example(item: str | Example) -> Example:
    return item if isinstance(item, Example) else Example(text=item)
