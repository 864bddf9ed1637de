"""(IA)^3: learned rescaling vectors of chosen linear layers (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", section 3.3).

A task t learns one vector per adapted layer ``y = W x + b``, initialised to ones so that a new task
starts as the base model. Attention projections (keys, values) scale their output; feed-forward layers
(the second matmul of each MLP block) scale their input::

    y = (W x + b) * l_t        l_t: (out,)   stored as (out, 1)   "output scaling"
    y = W (x * l_t) + b        l_t: (in,)    stored as (1, in)    "feed-forward"

These are exactly PEFT's IA3 semantics and stored shapes (GPT-2's ``Conv1D`` included: its weight is
(in, out), the vectors keep the same shapes). The default layers per family mirror PEFT's
``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` / ``..._FEEDFORWARD_MODULES_MAPPING``.

Every task's vectors at a layer live in one :class:`IA3Linear`. A batch of one task multiplies by its
vector (PEFT's computation); a batch that mixes tasks gathers each row's vector from a stack over the
bank's slots (ones for slots without a vector here) and does one broadcast multiply. A row is scaled
only by its own task's vector and multiplying by 1.0 is exact, so an IA3 wrapper and a LoRA wrapper on
the same layer give the same result in either order of the chain: for a feed-forward layer the input
that reaches the innermost linear is ``x * l_t`` whether LoRA sits outside (its base call receives the
scaled input) or inside (it is called with the scaled input) -- LoRA adds zero to (IA)^3 rows.

Merging folds the vector into the base weight (rows of W and the bias for output scaling, columns of W
for feed-forward) and unmerging divides it out again with the vector used at merge time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import Method, register
from multitune.methods.stack import SlotStack, Stack, per_row
from multitune.methods.wrap import (
    TaskLinear,
    find_linear,
    layers_of,
    remove_from_layers,
    wrapper_for,
)
from multitune.routing import Routing

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel

TARGET_FLAG = "--ia3-target-modules"
FEEDFORWARD_FLAG = "--ia3-feedforward-modules"

# (target modules, feed-forward modules) by family name: PEFT's IA3 tables for the same model types.
FAMILY_MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    # PEFT has no distilbert entry (it asks for target_modules); this is bert's choice in distilbert's names.
    "distilbert": (("k_lin", "v_lin", "ffn.lin2"), ("ffn.lin2",)),
    "t5": (("k", "v", "wo"), ("wo",)),
}
# Model types that share a family above but whose PEFT defaults differ; None: PEFT has no default and
# the family's names do not exist in the model, so the user must name the layers.
MODEL_TYPE_MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]] | None] = {
    **{
        t: (("q_proj", "v_proj", "down_proj"), ("down_proj",))
        for t in ("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "mt5": (("k", "v", "wi_1"), ()),
    "phi3": None,
    "mpnet": None,
}


@dataclass
class IA3Config:
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "names of the linear layers to rescale (comma-separated on the command line); 'all-linear' "
            "for every linear layer but the output head; default: the family's table (PEFT's)"
        },
    )
    feedforward_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "which of the targeted layers scale their input (feed-forward) rather than their output; "
            "default: the family's table (PEFT's)"
        },
    )

    def validate(self) -> list[str]:
        problems = []
        if self.target_modules is not None and not [t for t in self.target_modules if t.strip()]:
            problems.append(
                f"ia3 target_modules is empty; pass {TARGET_FLAG} with layer names, e.g. k_proj,v_proj,down_proj"
            )
        if self.feedforward_modules is not None and any(not f.strip() for f in self.feedforward_modules):
            problems.append(
                f"ia3 feedforward_modules holds an empty name; pass {FEEDFORWARD_FLAG} with layer names"
            )
        return problems


def default_modules(bank: MultiTaskModel) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The (target, feed-forward) module names PEFT would use for this base, or None when it has none."""
    model_type = getattr(bank.base.model.config, "model_type", "")
    if model_type in MODEL_TYPE_MODULES:
        return MODEL_TYPE_MODULES[model_type]
    return FAMILY_MODULES.get(bank.base.family.name)


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """A layer name matches a pattern equal to it or to a dotted suffix (as target modules match)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def plan(bank: MultiTaskModel, config: IA3Config) -> dict[str, bool]:
    """The layers a config adapts, each mapped to whether it is feed-forward (scales its input)."""
    defaults = default_modules(bank)
    if config.target_modules is None and defaults is None:
        from multitune.models import linear_module_names

        raise ConfigError(
            f"no default (IA)^3 targets for model type '{bank.base.family.name}'; pass {TARGET_FLAG} (and "
            f"{FEEDFORWARD_FLAG}) with some of its linear layers: {', '.join(linear_module_names(bank.base.model))}"
        )
    default_targets, default_feedforward = defaults or ((), ())
    targets = config.target_modules or list(default_targets)
    feedforward = (
        config.feedforward_modules if config.feedforward_modules is not None else list(default_feedforward)
    )
    names = find_linear(
        bank.base.model, targets, bank.output_layer_names(), TARGET_FLAG, bank.base.layer_lists()
    )
    if config.feedforward_modules is not None:
        stray = [f for f in feedforward if not any(matches(n, [f]) for n in names)]
        if stray:
            raise ConfigError(
                f"feed-forward modules {', '.join(stray)} are not among the targeted layers; "
                f"{FEEDFORWARD_FLAG} must name some of the layers in {TARGET_FLAG}"
            )
    return {n: matches(n, feedforward) for n in names}


class IA3Linear(TaskLinear):
    """A frozen linear layer with per-task rescaling vectors (ones at the start)."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__(base_layer, routing)
        self.ia3_l = nn.ParameterDict()  # task -> (out, 1) output scaling, or (1, in) feed-forward
        self.feedforward: dict[str, bool] = {}
        self.merged: dict[
            str, tuple[torch.Tensor, dict[str, torch.Tensor]]
        ] = {}  # task -> (vector, kept slices)
        self.stacked = SlotStack(routing, self._stack, lambda: self.ia3_l.values())

    def task_names(self) -> list[str]:
        return list(self.ia3_l)

    def add_task(self, task: str, feedforward: bool) -> nn.Parameter:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[task] = nn.Parameter(torch.ones(shape, device=self.weight.device))
        self.feedforward[task] = feedforward
        self.stacked.invalidate()
        return self.ia3_l[task]

    def remove_task(self, task: str) -> None:
        if task in self.merged:
            self.unmerge(task)
        del self.ia3_l[task], self.feedforward[task]
        self.stacked.invalidate()

    # ---- merge ---------------------------------------------------------------------------------------
    def _weight_scale(self, vector: torch.Tensor, feedforward: bool) -> torch.Tensor:
        """The vector shaped to broadcast over the innermost weight: (out, in) for Linear, (in, out) for Conv1D."""
        v = vector.reshape(-1)
        along_rows = feedforward == self.fan_in_fan_out  # Linear rows are outputs; Conv1D rows are inputs
        return v[:, None] if along_rows else v[None, :]

    def merge(self, task: str) -> None:
        """W <- W * l (and b <- b * l for output scaling), in float32 and cast back.

        Entries with |l| < 1e-6 would not divide back out; the weight slices they touch are kept.
        """
        if task in self.merged:
            return
        weight, bias = self.weight, self.bias  # the innermost layer's, through any inner wrappers
        vector = self.ia3_l[task].detach().reshape(-1).float().clone()
        feedforward = self.feedforward[task]
        tiny = (vector.abs() < 1e-6).nonzero(as_tuple=True)[0]
        kept: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            dim = 0 if feedforward == self.fan_in_fan_out else 1
            if tiny.numel():
                kept["weight"] = weight.index_select(dim, tiny).clone()
            weight.copy_((weight.float() * self._weight_scale(vector, feedforward)).to(weight.dtype))
            if not feedforward and bias is not None:
                if tiny.numel():
                    kept["bias"] = bias[tiny].clone()
                bias.copy_((bias.float() * vector).to(bias.dtype))
        self.merged[task] = (vector, kept)
        self.stacked.invalidate()

    def unmerge(self, task: str) -> None:
        if task not in self.merged:
            return
        weight, bias = self.weight, self.bias  # the innermost layer's, through any inner wrappers
        vector, kept = self.merged.pop(task)
        feedforward = self.feedforward[task]
        tiny = (vector.abs() < 1e-6).nonzero(as_tuple=True)[0]
        safe = torch.where(vector.abs() < 1e-6, torch.ones_like(vector), vector)
        with torch.no_grad():
            weight.copy_((weight.float() / self._weight_scale(safe, feedforward)).to(weight.dtype))
            if "weight" in kept:
                weight.index_copy_(0 if feedforward == self.fan_in_fan_out else 1, tiny, kept["weight"])
            if not feedforward and bias is not None:
                bias.copy_((bias.float() / safe).to(bias.dtype))
                if "bias" in kept:
                    bias[tiny] = kept["bias"]
        self.stacked.invalidate()

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing.disabled or routing.row_tasks is None or not self.ia3_l:
            return self.base_layer(x)
        task = routing.single
        if task is not None:  # a stacked task's scales multiply its components'
            scale_in, scale_out = self._scales(task, True, None), self._scales(task, False, None)
            if scale_in is not None:
                x = x * scale_in.to(x.dtype)
            y = self.base_layer(x)
            return y if scale_out is None else y * scale_out.to(y.dtype)
        rows = self.stacked.rows(x.shape[0], x.dtype)
        assert rows is not None  # every slot has a scale here (ones for tasks without a vector)
        scale_in, scale_out = rows.tensors
        if scale_in is not None:
            x = x * per_row(scale_in, x)
        y = self.base_layer(x)
        if scale_out is not None:
            y = y * per_row(scale_out.to(y.dtype), y)
        return y

    def _stack(self, present: set[str] | None) -> Stack:
        """Input scales (S, in) and output scales (S, out) over the bank's slots, each None when no task
        needs it here. A slot whose task has no vector of that kind here (or is merged) gets ones: its rows
        pass through exactly."""
        active = self._active(present)
        ref = next(iter(self.ia3_l.values()))
        ones_in, ones_out = ref.new_ones(self.in_features), ref.new_ones(self.out_features)
        slots = self.routing.slots
        scale_in = scale_out = None
        if any(self.feedforward[t] for t in active):
            scale_in = torch.stack([_or(self._scales(t, True, active), ones_in) for t in slots])
        if any(not self.feedforward[t] for t in active):
            scale_out = torch.stack([_or(self._scales(t, False, active), ones_out) for t in slots])
        return Stack((scale_in, scale_out), torch.arange(len(slots), device=ref.device))

    def _active(self, present: set[str] | None) -> set[str]:
        return {t for t in self.ia3_l if t not in self.merged and (present is None or t in present)}

    def _scales(self, task: str, feedforward: bool, active: set[str] | None) -> torch.Tensor | None:
        """The product of the input (``feedforward``) or output scales of ``task``'s chain here (its own, and
        a stacked task's components'), None when none of them has one."""
        vectors = [
            self.ia3_l[t].reshape(-1)
            for t in self.routing.chain(task)
            if (t in self.ia3_l and t not in self.merged if active is None else t in active)
            and self.feedforward[t] == feedforward
        ]
        if not vectors:
            return None
        out = vectors[0]
        for vector in vectors[1:]:
            out = out * vector
        return out


def _or(value: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if value is None else value


def attach(bank: MultiTaskModel, task: str, config: IA3Config) -> None:
    model = bank.base.model
    for name, feedforward in plan(bank, config).items():  # every check runs before the first layer is wrapped
        layer = wrapper_for(model, name, IA3Linear, bank.routing, bank.training)
        bank.own(task, f"{name}.ia3_l", layer.add_task(task, feedforward))


def detach(bank: MultiTaskModel, task: str) -> None:
    model = bank.base.model
    remove_from_layers(model, IA3Linear, task)


def ia3_layers(bank: MultiTaskModel, task: str) -> list[tuple[str, IA3Linear]]:
    return layers_of(bank.base.model, IA3Linear, task)


def merge(bank: MultiTaskModel, task: str) -> None:
    for _, layer in ia3_layers(bank, task):
        layer.merge(task)


def unmerge(bank: MultiTaskModel, task: str) -> None:
    for _, layer in ia3_layers(bank, task):
        layer.unmerge(task)


register(
    Method(
        name="ia3",
        config_class=IA3Config,
        attach=attach,
        detach=detach,
        summary="learned rescaling vectors of keys, values and feed-forward inputs (Liu et al. 2022)",
        default_learning_rate=3e-3,
        merge=merge,
        unmerge=unmerge,
    )
)
