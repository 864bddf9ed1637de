"""The Python API for trained tasks: load one and predict.

>>> import multitune
>>> task = multitune.load("runs/demo")            # a run folder or an adapter folder
>>> task.predict(["where is my parcel?"])
['shipping']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.data import Example
from multitune.errors import ConfigError
from multitune.health.versions import current_adapter
from multitune.models import load_base
from multitune.storage import CONFIG_FILE, load_adapter, read_adapter_config
from multitune.training.evaluate import evaluate, generate_texts, predict_labels, predict_proba


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder of a run folder, or the folder itself when it is one: its current version's
    (:func:`multitune.health.versions.current_adapter`; ``ROOT/versions/N`` pins version N)."""
    path = Path(path)
    adapter = current_adapter(path)
    if adapter is not None:
        return adapter
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist; give a run folder written by 'multitune train' or its adapter folder"
        )
    raise ConfigError(
        f"{path} holds no trained adapter (no {CONFIG_FILE} nor adapter/{CONFIG_FILE}); "
        "has its training finished? Resume it with 'multitune train --resume ...'"
    )


def _examples(items: Sequence[str | Example]) -> list[Example]:
    return [item if isinstance(item, Example) else Example(text=item) for item in items]


class TrainedTask:
    """One trained task on its base model, ready to predict."""

    def __init__(self, bank: MultiTaskModel, task: str, max_length: int = 128) -> None:
        self.bank, self.task, self.max_length = bank, task, max_length
        self.spec = bank.tasks[task]

    def _labelled(self, what: str) -> None:
        if self.spec.kind == "domain":  # loadable (to build on), but nothing to predict or score
            from multitune.domain import refusal

            raise ConfigError(refusal(self.task, self.spec.objective, what))

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def predict(
        self, items: Sequence[str | Example], batch_size: int = 64, **generate_kwargs: Any
    ) -> list[str]:
        """Labels for classification; generated text for generation."""
        self._labelled("predict")
        examples = _examples(items)
        if self.spec.kind == "classification":
            return predict_labels(self.bank, self.task, examples, self.max_length, batch_size)
        return generate_texts(
            self.bank,
            self.task,
            examples,
            self.max_length,
            batch_size=max(1, batch_size // 4),
            **generate_kwargs,
        )

    def predict_proba(self, items: Sequence[str | Example], batch_size: int = 64) -> torch.Tensor:
        self._labelled("predict_proba")
        if self.spec.kind != "classification":
            raise ConfigError(
                f"task '{self.task}' is a generation task; probabilities are for classification"
            )
        return predict_proba(self.bank, self.task, _examples(items), self.max_length, batch_size)

    def evaluate(self, examples: Sequence[Example], batch_size: int = 64) -> dict[str, float]:
        self._labelled("evaluate")
        return evaluate(self.bank, self.task, examples, self.max_length, batch_size)


def load(path: str | Path, model: str | None = None, device: str | None = None) -> TrainedTask:
    """Load a trained task from a run or adapter folder onto its base (or ``model``, to point elsewhere)."""
    folder = adapter_folder(path)
    meta = read_adapter_config(folder)
    base = load_base(model or meta["base_model"], device=device, quantize=meta.get("base_quantize"))
    bank = MultiTaskModel(base)
    spec = load_adapter(bank, folder)
    from multitune.serve.engine import trained_max_length  # the run's config.yaml, versions included

    return TrainedTask(bank, spec.name, trained_max_length(folder))
