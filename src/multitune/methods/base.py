"""The frozen base as it is: no adapter. Classification trains only its head (a linear probe).

Rows of such a task pass through every wrapper, prompt and prefix of the bank unchanged, which makes it
the reference row of mixed batches and the cheapest baseline a comparison can have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from multitune.methods import Method, register

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel


@dataclass
class BaseConfig:
    def validate(self) -> list[str]:
        return []


def attach(bank: MultiTaskModel, task: str, config: BaseConfig) -> None:
    """Nothing to attach: the bank adds the head of a classification task."""


def detach(bank: MultiTaskModel, task: str) -> None:
    """Nothing to take off."""


register(
    Method(
        name="base",
        config_class=BaseConfig,
        attach=attach,
        detach=detach,
        summary="the frozen base, no adapter (classification: a trained head only, a linear probe)",
        default_learning_rate=1e-3,
        compared=False,
    )
)
