"""LoRA: low-rank updates of linear layers (Hu et al. 2021, "LoRA", section 4.1).

For a frozen linear layer ``y = W x`` a task t adds a rank-r update::

    y = W x + s_t * B_t (A_t dropout(x)),   A_t: (r, in), B_t: (out, r),   s_t = alpha / r
                                                                          (rsLoRA: alpha / sqrt(r))

A_t is initialised like a linear layer (Kaiming uniform) and B_t to zeros, so a new task starts as the
base model. Every task's A and B live in one :class:`LoRALinear` that wraps the base layer, keyed by the
task name. A batch of one task takes the fast path (two small matmuls, exactly PEFT's computation); a
batch that mixes tasks gathers each row's A and B from a stack padded to the largest rank and does
batched matmuls, so per-row routing costs no Python loop over tasks.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", sections 4.1 and 4.3), ``use_dora``,
splits the adapted weight W' = W + s B A into a learned magnitude m (out,) and a direction::

    W'' = m * W' / ||W'||_c,      ||W'||_c: the L2 norm of each output feature's row of W'   (out,)
    y   = W'' x + bias = g * (W x + s B A x) + bias,    g = m / ||W + s B A||_c

m starts at ||W||_c (B is zero), so a new DoRA task also starts as the base. As the paper's section 4.3
and PEFT do, the norm is a constant of the graph (detached): gradients reach m, A and B through g and
B A x, never through the norm. We compute exactly PEFT's ``DoraLinearLayer`` expression, the base output
reused: ``y + (g - 1) * (W x) + g * s * B A x``; with dropout while training, ``W x`` and ``B A x`` both read
the dropped input (PEFT's choice). Rows of plain LoRA tasks in a mixed batch get g = 1, which is their
LoRA update exactly. Merging writes ``g * (W + s B A)`` into the base weight and unmerging divides the
same g out again (kept from the merge, like PEFT's cached norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import Method, register
from multitune.methods.stack import (
    Dense,
    Rows,
    SlotStack,
    Stack,
    add_rows,
    concatenated,
    dense_pays,
    masked,
    slot_index,
)
from multitune.methods.wrap import (
    TaskLinear,
    find_linear,
    innermost,
    layers_of,
    remove_from_layers,
    weight_of,
    wrapper_for,
)
from multitune.routing import Routing

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel


@dataclass
class LoRAConfig:
    rank: int = field(default=8, metadata={"help": "rank r of the update B A"})
    alpha: float = field(
        default=16.0, metadata={"help": "scaling numerator: the update is scaled by alpha/r"}
    )
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input during training"})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "names of the linear layers to adapt (comma-separated on the command line); "
            "'all-linear' for every linear layer of the transformer blocks; default: the family's table "
            "(all-linear for BERT-like encoders, q/v projections for decoders and T5)"
        },
    )
    rslora: bool = field(
        default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023)"}
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA (Liu et al. 2024): a learned magnitude per output feature times the direction of "
            "W + s B A (PEFT's use_dora); one more vector per layer, slower steps"
        },
    )

    def validate(self) -> list[str]:
        problems = []
        if self.rank < 1:
            problems.append(f"lora rank must be >= 1 (got {self.rank}); try --lora-rank 8")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora dropout must be in [0, 1) (got {self.dropout})")
        if self.alpha <= 0:
            problems.append(f"lora alpha must be > 0 (got {self.alpha}); try --lora-alpha 16")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(TaskLinear):
    """A frozen linear layer with per-task low-rank updates (and DoRA magnitudes for DoRA tasks)."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__(base_layer, routing)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA tasks only: m (out,)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged: set[str] = set()
        self._merged_factor: dict[str, torch.Tensor] = {}  # DoRA: the g a merge multiplied in, to divide out
        self._gain: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}  # DoRA: g cached while no grad
        self.stacked = SlotStack(routing, self._stack, self._versioned, self._concatenated)

    def task_names(self) -> list[str]:
        return list(self.lora_A)

    def _versioned(self) -> list[torch.Tensor]:
        """The tensors whose in-place changes make cached stacks stale (DoRA's g also reads the base)."""
        dora = [*self.lora_magnitude_vector.values(), self.weight] if self.lora_magnitude_vector else []
        return [*self.lora_A.values(), *self.lora_B.values(), *dora]

    def add_task(
        self, task: str, rank: int, scaling: float, dropout: float, dora: bool = False
    ) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter | None]:
        """A task's A (r, in) and B (out, r), and with ``dora`` its magnitude m (out,) = ||W||_c."""
        device = self.weight.device
        a = torch.empty(rank, self.in_features, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.lora_A[task] = nn.Parameter(a)
        self.lora_B[task] = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.scaling[task], self.dropout[task] = scaling, dropout
        if dora:
            self.lora_magnitude_vector[task] = nn.Parameter(self.weight_norm(task).float())
        self.stacked.invalidate()
        return self.lora_A[task], self.lora_B[task], self.lora_magnitude_vector.get(task)

    def remove_task(self, task: str) -> None:
        if task in self.merged:
            self.unmerge(task)
        del self.lora_A[task], self.lora_B[task], self.scaling[task], self.dropout[task]
        if task in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[task]
        self._gain.pop(task, None)
        self.stacked.invalidate()

    def delta_weight(self, task: str) -> torch.Tensor:
        """s * B A in the orientation of the base layer's weight."""
        delta = self.scaling[task] * (self.lora_B[task] @ self.lora_A[task])
        return delta.T if self.fan_in_fan_out else delta

    def _base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W as (out, in), whatever the base layer's orientation (GPT-2's Conv1D stores (in, out))."""
        w = self.weight.to(dtype)
        return w.T if self.fan_in_fan_out else w

    def weight_norm(self, task: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """||W + s B A||_c (out,), detached: DoRA's norm, a constant of the graph (paper section 4.3)."""
        a, b = self.lora_A[task].detach().to(dtype), self.lora_B[task].detach().to(dtype)
        w = self._base_weight(dtype).detach() + self.scaling[task] * (b @ a)
        return torch.linalg.norm(w, dim=1).to(dtype)

    def gain(self, task: str, dtype: torch.dtype) -> torch.Tensor:
        """DoRA's g = m / ||W + s B A||_c (out,): a graph to m while training, cached while no grad is needed
        (every decoding step would otherwise recompute B A and the norm)."""
        m = self.lora_magnitude_vector[task]
        if torch.is_grad_enabled():
            return m.to(dtype) / self.weight_norm(task, dtype)
        key = (m._version, self.lora_A[task]._version, self.lora_B[task]._version, self.weight._version)
        cached = self._gain.get(task)
        if cached is None or cached[0] != key or cached[1].dtype != dtype:
            cached = (key, (m.to(dtype) / self.weight_norm(task, dtype)).detach())
            self._gain[task] = cached
        return cached[1]

    def merge(self, task: str) -> None:
        """W <- W + s B A (LoRA) or g * (W + s B A) (DoRA: what a forward with the task computes)."""
        if task not in self.merged:
            with torch.no_grad():
                delta = self.delta_weight(task).to(self.weight.dtype)
                if task in self.lora_magnitude_vector:
                    g = self.gain(task, torch.float32).detach()
                    factor = (g.view(1, -1) if self.fan_in_fan_out else g.view(-1, 1)).to(self.weight.dtype)
                    self._merged_factor[task] = factor
                    self.weight.copy_(factor * (self.weight + delta))
                else:
                    self.weight.add_(delta)
            self.merged.add(task)
            self.stacked.invalidate()

    def unmerge(self, task: str) -> None:
        if task in self.merged:
            with torch.no_grad():
                delta = self.delta_weight(task).to(self.weight.dtype)
                if task in self._merged_factor:
                    self.weight.copy_(self.weight / self._merged_factor.pop(task) - delta)
                else:
                    self.weight.sub_(delta)
            self.merged.discard(task)
            self.stacked.invalidate()

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, task: str) -> torch.Tensor:
        """y + s * (dropout(x) A^T) B^T, the scale and the sum fused into one addmm.

        PEFT computes ``lora_B(lora_A(x)) * s`` and then adds it: two more passes over a (B, L, out)
        tensor and one more temporary of that size per layer. A DoRA task takes PEFT's DoRA expression
        (see the module docstring), which needs those passes anyway.
        """
        a, b = self.lora_A[task].to(x.dtype), self.lora_B[task].to(x.dtype)
        p = self.dropout[task]
        dropped = self.training and p > 0
        if dropped:
            x = F.dropout(x, p)
        low = F.linear(x, a)  # (..., r)
        if task in self.lora_magnitude_vector:
            g = self.gain(task, x.dtype)  # (out,)
            base = F.linear(x, self._base_weight(x.dtype)) if dropped else self._without_bias(y)
            return y + (g - 1) * base + g * F.linear(low, b) * self.scaling[task]
        out = torch.addmm(
            y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), b.t(), alpha=self.scaling[task]
        )
        return out.view(y.shape)

    def _without_bias(self, y: torch.Tensor) -> torch.Tensor:
        """W x from the base output W x + bias."""
        return y if self.bias is None else y - self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routing = self.routing
        if routing.disabled or routing.row_tasks is None or not self.lora_A:
            return y
        task = routing.single
        if task is not None:
            for member in routing.chain(task):  # a stacked task's components' deltas add to its own
                if member in self.lora_A and member not in self.merged:
                    y = self._add_lora(y, x, member)
            return y
        for rows in self.stacked.levels(x.shape[0], x.dtype):
            if rows is None:
                continue
            # the concatenated factors for decode-sized inputs (prepared only without a gradient);
            # a prefill's many positions per row make per-row factors cheaper (fewer FLOPs per row)
            dense = rows.prepared() if dense_pays(x) else None
            y = self._dense(x, y, dense) if dense is not None else self._mixed(x, y, rows)
        return y

    def _stack(self, present: set[str] | None) -> Stack | None:
        """A (T, R, in), B (T, out, R), scale (T,), keep (T,), when a DoRA task is among them g (T, 1, out)
        (ones for plain LoRA tasks), else None, and each task's own rank (T,), of the T tasks with an update here (not merged), ranks padded to the
        largest R; slots of other tasks pass through. None when no task has an update here.

        Only tasks with an update are stacked, so the stack is as large as their parameters however many
        tasks the bank holds (:class:`~multitune.methods.stack.SlotStack` caches it and gathers per row).
        """
        tasks = [
            t
            for t in self.routing.slots
            if t in self.lora_A and t not in self.merged and (present is None or t in present)
        ]
        if not tasks:
            return None
        rank = max(self.lora_A[t].shape[0] for t in tasks)
        device = self.lora_A[tasks[0]].device
        a = torch.stack([F.pad(self.lora_A[t], (0, 0, 0, rank - self.lora_A[t].shape[0])) for t in tasks])
        b = torch.stack([F.pad(self.lora_B[t], (0, rank - self.lora_B[t].shape[1])) for t in tasks])
        scale = torch.tensor([self.scaling[t] for t in tasks], device=device).view(-1, 1, 1)
        keep = torch.tensor([1.0 - self.dropout[t] for t in tasks], device=device).view(-1, 1, 1)
        g = None
        if any(t in self.lora_magnitude_vector for t in tasks):
            ones = torch.ones(self.out_features, device=device)
            g = torch.stack(
                [self.gain(t, torch.float32) if t in self.lora_magnitude_vector else ones for t in tasks]
            ).unsqueeze(1)
        ranks = torch.tensor([self.lora_A[t].shape[0] for t in tasks], device=device)
        return Stack((a, b, scale, keep, g, ranks), slot_index(self.routing, tasks, device))

    def _concatenated(self, stack: Stack, index: torch.Tensor, dtype: torch.dtype) -> Dense | None:
        """The batch's LoRA tasks here as one pair of factors, each A scaled by its task's s, made once per routed
        batch (:func:`~multitune.methods.stack.concatenated`); None with a DoRA task (per-row g)."""
        a, b, scale = cast(tuple[torch.Tensor, ...], stack.tensors[:3])
        if stack.tensors[4] is not None:
            return None
        ranks = cast(torch.Tensor, stack.tensors[5])
        found = concatenated(index, a * scale, b, self.in_features, self.out_features, dtype, ranks)
        return None if found is None else found[1]

    def _dense(self, x: torch.Tensor, y: torch.Tensor, dense: Dense) -> torch.Tensor:
        """y + each row's s_t B_t A_t x as two GEMMs over the batch's tasks' concatenated factors, the columns
        of other tasks masked out of each row between them (no per-row copies of A and B)."""
        low = masked(F.linear(x.reshape(-1, x.shape[-1]), dense.down), x.shape[0], dense.mask)  # (B L, P R)
        out = y if y.is_contiguous() else y.contiguous()
        out.view(-1, out.shape[-1]).addmm_(low, dense.up)
        return out

    def _mixed(self, x: torch.Tensor, y: torch.Tensor, rows: Rows) -> torch.Tensor:
        """y plus each row's s_t B_t A_t x (DoRA rows: (g_t - 1) W x + g_t s_t B_t A_t x): batched matmuls over
        the rows whose task has an update here (at one level of a stacked task's chain)."""
        a, b, scale, keep = cast(tuple[torch.Tensor, ...], rows.tensors[:4])  # never None
        g = rows.tensors[4]  # (N, 1, out) or None: no DoRA task here
        squeeze = x.dim() == 2
        h = x.unsqueeze(1) if squeeze else x  # (B, L, in)
        if rows.idx is not None:
            h = h.index_select(0, rows.idx)  # (N, L, in)
        dropped = self.training and bool((keep < 1).any())
        if self.training:
            h = h * torch.bernoulli(keep.expand_as(h)) / keep
        low = torch.bmm(h, a.transpose(1, 2)) * scale  # (N, L, R)
        out = torch.bmm(low, b.transpose(1, 2))  # (N, L, out)
        if g is not None:
            if dropped:  # as PEFT: the base part of DoRA's update reads the dropped input too
                base = F.linear(h, self._base_weight(x.dtype))
            else:
                base = self._without_bias(y.unsqueeze(1) if squeeze else y)
                base = base if rows.idx is None else base.index_select(0, rows.idx)
            out = (g - 1) * base + g * out
        return add_rows(y, rows, out.squeeze(1) if squeeze else out)


def attach(bank: MultiTaskModel, task: str, config: LoRAConfig) -> None:
    model = bank.base.model
    targets = config.target_modules or list(bank.base.family.lora_targets)
    if not targets:
        from multitune.models import linear_module_names

        raise ConfigError(
            f"no default LoRA targets for model type '{bank.base.family.name}'; pass --lora-target-modules with "
            f"some of its linear layers: {', '.join(linear_module_names(model))}"
        )
    names = find_linear(
        model, targets, bank.output_layer_names(), "--lora-target-modules", bank.base.layer_lists()
    )
    if config.use_dora:
        stored = sorted({str(weight_of(innermost(model.get_submodule(n))).dtype) for n in names})
        if any(not weight_of(innermost(model.get_submodule(n))).is_floating_point() for n in names):
            raise ConfigError(
                f"DoRA takes the norm of the base's weights, which are stored as {', '.join(stored)} here "
                "(a quantized base); load the base unquantized or drop --lora-use-dora"
            )
    if config.target_modules is None:  # pinned in the task's config: a saved task keeps its layers when the
        bank.tasks[task].config["target_modules"] = list(targets)  # family's default targets change
    for name in names:
        layer = wrapper_for(model, name, LoRALinear, bank.routing, bank.training)
        a, b, m = layer.add_task(task, config.rank, config.scaling, config.dropout, config.use_dora)
        bank.own(task, f"{name}.lora_A.weight", a)
        bank.own(task, f"{name}.lora_B.weight", b)
        if m is not None:  # PEFT's key for DoRA's magnitude, in its files as in ours
            bank.own(task, f"{name}.lora_magnitude_vector", m)


def saved(config: LoRAConfig, state: dict[str, torch.Tensor]) -> LoRAConfig:
    """The config of a saved LoRA task: one saved without targets (before they were recorded, when they were
    the family's defaults of then) adapts exactly the layers its tensors name."""
    if config.target_modules is not None:
        return config
    layers = sorted({key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key})
    return replace(config, target_modules=layers or None)


def detach(bank: MultiTaskModel, task: str) -> None:
    model = bank.base.model
    remove_from_layers(model, LoRALinear, task)


def lora_layers(bank: MultiTaskModel, task: str) -> list[LoRALinear]:
    return [layer for _, layer in layers_of(bank.base.model, LoRALinear, task)]


def merge(bank: MultiTaskModel, task: str) -> None:
    for layer in lora_layers(bank, task):
        layer.merge(task)


def unmerge(bank: MultiTaskModel, task: str) -> None:
    for layer in lora_layers(bank, task):
        layer.unmerge(task)


def search(trial: Any) -> dict[str, Any]:
    """compare's LoRA settings: the rank, with alpha = 2r (the usual ratio, so that the scale alpha/r stays 2)."""
    rank = trial.suggest_categorical("lora.rank", [4, 8, 16])
    return {"lora.rank": rank, "lora.alpha": 2.0 * rank}


register(
    Method(
        name="lora",
        config_class=LoRAConfig,
        attach=attach,
        detach=detach,
        summary="low-rank updates B A of chosen linear layers (Hu et al. 2021)",
        # MiniLM, 1,000 examples, 2 epochs, r8 q/v: at 5e-4 SST-2 0.780/0.802 (seeds 0/1) and TREC 0.910 against
        # full fine-tuning's 0.809/0.811 and 0.928; at 2e-3 0.838/0.825 and 0.926 (all-linear at 1e-3: 0.826).
        # Encoders' default targets are every linear layer of the blocks (models.FAMILIES): on the learning
        # grid's four subsets x two seeds at 2e-3, r8, mean validation accuracy all-linear 0.894 against q/v
        # 0.877 (r4 0.874, r16 0.871: the rank stays 8)
        default_learning_rate=2e-3,
        merge=merge,
        unmerge=unmerge,
        search=search,
        saved=saved,
    )
)
