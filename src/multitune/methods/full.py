"""Full fine-tuning: every weight of the base is trained (optionally all but the first N blocks).

The exception to the bank design: the task owns the base weights, so a bank holding a fully fine-tuned
task holds nothing else, and each such task is its own model copy (the seed documents' scalability
row). Its stored adapter is every weight it trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from multitune.errors import ConfigError
from multitune.methods import Method, register

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel


@dataclass
class FullConfig:
    freeze_layers: int = field(
        default=0,
        metadata={"help": "freeze the embeddings and the first N transformer blocks (0 trains everything)"},
    )

    def validate(self) -> list[str]:
        if self.freeze_layers < 0:
            return [f"full freeze_layers must be >= 0 (got {self.freeze_layers})"]
        return []


# Parameter names of input embeddings (token, position, type) across the families of models.FAMILIES.
_EMBEDDING = re.compile(r"(^|\.)(embed\w*|embeddings|wte|wpe|shared)\.")


def frozen_modules(bank: MultiTaskModel, freeze_layers: int) -> list[nn.Module]:
    """The input embeddings and the first ``freeze_layers`` blocks of every block stack."""
    if freeze_layers == 0:
        return []
    stacks = bank.base.layer_lists()
    depth = min(len(s) for s in stacks) if stacks else 0
    if freeze_layers > depth:
        raise ConfigError(
            f"full freeze_layers={freeze_layers} but the model has {depth} layers; use 0..{depth}"
        )
    model = bank.base.model
    embeddings = [m for n, m in model.named_modules() if _EMBEDDING.search(n + ".")]
    return [
        model.get_input_embeddings(),
        *embeddings,
        *(block for stack in stacks for block in stack[:freeze_layers]),
    ]


def attach(bank: MultiTaskModel, task: str, config: FullConfig) -> None:
    others = [t for t in bank.tasks if t != task]
    if others:
        raise ConfigError(
            f"full fine-tuning changes the base, so task '{task}' needs a bank of its own; "
            f"this bank already holds: {', '.join(others)}"
        )
    model = bank.base.model
    model.float()  # trained weights are kept in float32; autocast computes in bfloat16 on a GPU
    frozen = {id(p) for m in frozen_modules(bank, config.freeze_layers) for p in m.parameters()}
    # Parameters a task never uses would only add bytes to what it stores: BERT's pooler (our heads pool
    # the hidden states) and, for classification, a decoder's LM head unless it is tied to the embeddings.
    unused = {id(p) for n, p in model.named_parameters() if n.startswith("pooler.")}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if bank.tasks[task].kind == "classification" and output is not None:
        tied = {id(p) for p in model.get_input_embeddings().parameters()}
        unused |= {id(p) for p in output.parameters() if id(p) not in tied}
    for name, param in model.named_parameters():
        if id(param) not in frozen and id(param) not in unused:
            param.requires_grad_(True)
            bank.own(task, name, param)


def detach(bank: MultiTaskModel, task: str) -> None:
    bank.base.model.requires_grad_(False)


register(
    Method(
        name="full",
        config_class=FullConfig,
        attach=attach,
        detach=detach,
        summary="every weight of the base trained; one model copy per task",
        changes_base=True,
        default_learning_rate=3e-5,
    )
)
