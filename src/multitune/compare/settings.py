"""The settings of one comparison (what ``multitune compare`` is asked to do), and what a rerun must share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitune.config import DataConfig, TrainConfig
from multitune.data import TaskKind
from multitune.methods import METHODS

RESULTS = "results"
BANK = "bank"


def default_methods() -> list[str]:
    """Every registered method compare runs by default (the registry's ``compared``), by name."""
    return sorted(name for name, method in METHODS.items() if method.compared)


@dataclass
class CompareConfig:
    model: str = "minilm"
    task: str = "task"
    kind: TaskKind = "classification"  # the CLI's --kind offers these two only
    methods: list[str] = field(default_factory=default_methods)
    trials: int = 8
    max_epochs: int = 3
    seeds: int = 1  # the chosen settings trained with seeds seed, seed+1, ...: the test metric's spread
    output: str = "runs/compare"
    storage: str | None = None
    study_name: str | None = None
    search_only: bool = False
    isolate: bool = True
    latency_examples: int = 32
    bootstrap: int = 1000
    seed: int = 0
    progress: bool = True
    command: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_settings: dict[str, Any] = field(default_factory=dict)  # fixed (not searched) settings per method
    general_data: str | None = None  # generation: general-text sample file (None: the built-in one)
    audit: bool = (
        False  # the counterfactual bias audit of each final run on the test split (compare/audit.py)
    )
    audit_attributes: list[str] | None = None  # None: every built-in attribute
    audit_language: str = "en"
    merge_with: list[str] = field(default_factory=list)  # --methods ...,merged: the tasks it merges LoRA with
    merge_method: str = "ties"
    search_dora: bool = False  # LoRA's search also chooses between LoRA and DoRA (lora.use_dora)

    @property
    def out(self) -> Path:
        return Path(self.output)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def metric(self) -> str:
        return self.train.metric or ("accuracy" if self.kind == "classification" else "rouge_l")

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed compare must share with the first run (methods may be added).

        ``seeds`` only when not 1 and ``general_data`` only when given: folders made before those flags existed
        resume as they are (a method's general-text perplexity is only comparable on the same sample)."""
        return {
            **({"seeds": self.seeds} if self.seeds != 1 else {}),
            **({"general_data": self.general_data} if self.general_data is not None else {}),
            **({"search_dora": True} if self.search_dora else {}),
            "model": self.model,
            "task": self.task,
            "kind": self.kind,
            "trials": self.trials,
            "max_epochs": self.max_epochs,
            "data": dataclasses.asdict(self.data),
            "train": {
                k: v
                for k, v in dataclasses.asdict(self.train).items()
                if k
                not in ("device", "keep_checkpoint", "report_to")  # (where it is logged: not its results)
            },
        }


def to_json(config: CompareConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["method_settings"] = {n: dataclasses.asdict(c) for n, c in config.method_settings.items()}
    return data


def from_json(data: dict[str, Any]) -> CompareConfig:
    data = dict(data)
    data["data"] = DataConfig(**data["data"])
    data["train"] = TrainConfig(**data["train"])
    data["method_settings"] = {n: METHODS[n].config_class(**v) for n, v in data["method_settings"].items()}
    return CompareConfig(**data)
