"""MultiTaskModel: one frozen base, any number of tasks, per-row routing by task id.

A task is (method + its parameters + its head or LM target). Methods attach their parameters to the
base's layers (see ``multitune.methods``); the bank keeps the task list, the per-task classification
heads, and the routing state those layers read. Training one task is the case of a bank with one task.

Batches carry ``task_ids`` (B,) indexing :attr:`MultiTaskModel.slots`; every row can belong to a
different task.

State-dict keys of a task (what :meth:`task_state_dict` returns and adapters store) are a public API:
``{module path}.lora_A.weight`` / ``.lora_B.weight`` for LoRA, the base parameter names for full
fine-tuning, ``head.weight`` / ``head.bias`` for a classification head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.models import Base
from multitune.routing import Routing

if TYPE_CHECKING:
    from transformers import GenerationMixin

TaskKind = Literal["classification", "generation", "domain"]  # domain: self-supervised on raw text
Pooling = Literal["mean", "cls", "last"]
M = TypeVar("M", bound=nn.Module)
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass
class TaskSpec:
    """Everything needed to rebuild a task on a base, apart from its tensors."""

    name: str
    kind: TaskKind
    method: str
    config: dict[str, Any]  # the method config's fields
    labels: list[str] = field(default_factory=list)  # classification label set, in head order
    pooling: Pooling | None = None  # classification: how a sequence becomes one vector
    objective: str | None = None  # domain: clm, mlm or simcse (multitune.domain)
    stack_on: str | None = None  # the bank task this one runs on top of (multitune.compose.stack)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelInputs:
    """A batch's inputs as input-side methods build them, before the bank assembles the model's keywords.

    A method's ``inputs`` hook adds its rows' contribution: virtual token embeddings before the text
    (``virtual`` (B, W, d) with ``virtual_mask`` (B, W)), or a cache that already holds positions before the
    text (``cache`` with ``cache_mask`` (B, P)). Rows of other tasks get masked positions.
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L) over the text
    task_ids: torch.Tensor  # (B,) slots
    virtual: torch.Tensor | None = None
    virtual_mask: torch.Tensor | None = None
    cache: Any = None
    cache_mask: torch.Tensor | None = None

    def add_virtual(self, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        if self.virtual is not None:
            raise ConfigError("two input-side methods both prepend virtual tokens; one method per task must")
        self.virtual, self.virtual_mask = embeds, mask

    def add_cache(self, cache: Any, mask: torch.Tensor) -> None:
        if self.cache is not None:
            raise ConfigError(
                "two input-side methods both fill the attention cache; one method per task must"
            )
        self.cache, self.cache_mask = cache, mask


@dataclass
class Routed:
    """What :meth:`MultiTaskModel.run` returns: the model's output, the virtual positions before the text
    (``width``) and the attention mask the model saw (cache positions, virtual positions, text)."""

    out: Any
    width: int
    attention_mask: torch.Tensor


def default_pooling(base: Base) -> Pooling:
    """Mean over tokens for encoders (what sentence encoders are trained for); the last token for decoders."""
    return "mean" if base.arch == "encoder" else "last"


class MultiTaskModel(nn.Module):
    """A frozen base with per-task adapters and heads, routed per row."""

    def __init__(self, base: Base) -> None:
        super().__init__()
        self.base = base
        self.model = base.model  # registered, so .to() and state_dict() see the base
        self.heads = nn.ModuleDict()
        self.stores = (
            nn.ModuleDict()
        )  # method name -> the module that holds its tasks' tensors (prompts, prefixes)
        self.tasks: dict[str, TaskSpec] = {}
        self.routing = Routing()
        self._owned: dict[str, dict[str, nn.Parameter]] = {}
        # task -> (adapter folder, sha256 of its weights) for tasks loaded from disk (stacked tasks refer to them)
        self.loaded_from: dict[str, tuple[Path, str]] = {}
        self._inputs: list[Any] = []
        self._inputs_version = -1
        self.eval()  # a bank serves until a training loop says otherwise

    # ---- tasks -------------------------------------------------------------------------------------
    @property
    def slots(self) -> list[str]:
        return self.routing.slots

    def add_task(
        self,
        name: str,
        kind: TaskKind,
        method: str,
        config: Any = None,
        labels: list[str] | None = None,
        pooling: Pooling | None = None,
        objective: str | None = None,
        stack_on: str | None = None,
    ) -> TaskSpec:
        """Attach a new task's parameters (and its head, for classification; a masked-LM head for a domain
        task with objective mlm, :mod:`multitune.domain`); other tasks are untouched.

        ``stack_on``: a task of the bank whose parameters this task's rows run through first (its own
        on top: :mod:`multitune.compose.stack`); that task's parameters are frozen from then on."""
        if not _TASK_NAME.match(name):
            raise ConfigError(
                f"task name '{name}' must be 1-64 letters, digits, '_' or '-', starting with a letter or digit"
            )
        if name in self.tasks:
            raise ConfigError(f"task '{name}' is already in the bank; remove it first or choose another name")
        spec_method = get_method(method)
        if spec_method.changes_base and self.base.quantize:
            raise ConfigError(
                f"{method} trains the base's weights, which are quantized to {self.base.quantize} here; drop "
                "--quantize (load the base unquantized) or use an adapter method"
            )
        config = config if config is not None else spec_method.config_class()
        problems = config.validate()
        if problems:
            raise ConfigError("; ".join(problems))
        if stack_on is not None:
            from multitune.compose.stack import check_stack

            check_stack(self, name, method, config, stack_on)
        objective = self._kind_objective(name, kind, spec_method, labels, objective)
        spec = TaskSpec(
            name,
            kind,
            method,
            asdict(config),
            list(labels or []),
            (pooling or default_pooling(self.base)) if kind == "classification" else None,
            objective,
            stack_on,
        )
        self._attach(spec, config)
        if kind == "classification" and spec_method.score is None:  # a method that scores labels has no head
            head = nn.Linear(self.base.hidden_size, len(labels or []), device=self.base.device)
            self.heads[name] = head
            for key, param in head.named_parameters():
                self.own(name, f"head.{key}", param)
        if objective == "mlm":  # a head over the frozen input embeddings (multitune.domain.MLMHead)
            from multitune.domain import mlm_head

            self.heads[name] = mlm_head(self.base)
            for key, param in self.heads[name].named_parameters():
                self.own(name, f"head.{key}", param)
        self.routing.slots.append(name)
        self.routing.version += 1
        return spec

    def _kind_objective(
        self, name: str, kind: TaskKind, method: Any, labels: list[str] | None, objective: str | None
    ) -> str | None:
        """Refuse a task whose kind does not fit its labels, base or method; a domain task's objective."""
        if kind == "classification" and len(labels or []) < 2:
            raise ConfigError(f"classification task '{name}' needs at least 2 labels (got {labels or []})")
        if kind == "generation" and self.base.arch == "encoder":
            raise ConfigError(
                f"generation needs a causal LM or a seq2seq model; {self.base.source} is an encoder. "
                "Use a decoder such as smollm2-135m, or a classification task"
            )
        if kind == "domain":
            from multitune import domain

            objective = domain.objective_for(self.base, objective)
            if method.fit is not None:
                raise ConfigError(
                    f"{method.name} has no parameters to train on raw text; choose a method that trains"
                )
        elif objective is not None:
            raise ConfigError(
                f"a domain objective ({objective}) is for --kind domain, not a {kind} task; drop it"
            )
        return objective

    def _attach(self, spec: TaskSpec, config: Any) -> None:
        """Register ``spec`` and attach its method's parameters (nothing is left behind when that fails); a
        stacked task's components are frozen from then on."""
        name = spec.name
        self._owned[name] = {}
        self.tasks[name] = spec  # before attach: a method may read the task's labels (prompt init)
        if spec.stack_on is not None:  # before attach: a method may start from its component (adapter norms)
            self.routing.components[name] = self.routing.chain(spec.stack_on)
        try:
            get_method(spec.method).attach(self, name, config)
        except Exception:
            self._owned.pop(name, None)
            self.tasks.pop(name, None)
            self.routing.components.pop(name, None)
            raise
        for member in self.routing.components.get(name, ()):
            for param in self._owned[member].values():
                param.requires_grad_(False)

    def remove_task(self, name: str) -> None:
        spec = self.spec(name)
        above = [t for t, members in self.routing.components.items() if name in members]
        if above:
            raise ConfigError(
                f"task '{name}' is the base component of stacked task(s) {', '.join(above)}; remove "
                f"{'them' if len(above) > 1 else 'it'} first"
            )
        get_method(spec.method).detach(self, name)
        self.routing.components.pop(name, None)
        if name in self.heads:
            del self.heads[name]
        del self.tasks[name], self._owned[name]
        self.loaded_from.pop(name, None)
        self.routing.slots.remove(name)
        self.routing.version += 1

    def grow_labels(self, task: str, new_labels: list[str]) -> None:
        """Append ``new_labels`` to a classification task's labels; every old label's logit stays as it was.

        The head W (K, d), b (K,) becomes W' (K+n, d), b' (K+n,) with W'[:K] = W, b'[:K] = b copied exactly, so
        logit_c(x) = W'_c . h(x) + b'_c is unchanged for c < K up to float rounding (a wider matmul may take another
        BLAS kernel: 1-4 ulp on CPU at some batch sizes), and so are predictions among old labels; probabilities
        are not (the new labels take their share of the softmax). The n new rows start as a fresh head's do
        (nn.Linear's U(-1/sqrt(d), 1/sqrt(d))).
        The new tensors are owned under the same keys, so task_parameters, saving and loading see them. A method
        that scores labels itself (prompting) has no head: only its label list grows (its caches are keyed on
        the labels). Other tasks are not touched.
        """
        spec = self.spec(task)
        if spec.kind != "classification":
            raise ConfigError(
                f"task '{task}' generates text and has no labels to grow; give a classification task"
            )
        known = sorted({label for label in new_labels if label in spec.labels or new_labels.count(label) > 1})
        if known:
            raise ConfigError(
                f"label(s) {known[:5]} are already in task '{task}' or given twice; give each new label once"
            )
        if task in self.heads:
            old = cast(nn.Linear, self.heads[task])  # add_task makes every head (ModuleDict types it Module)
            w = old.weight
            head = nn.Linear(w.shape[1], w.shape[0] + len(new_labels), device=w.device, dtype=w.dtype)
            with torch.no_grad():
                head.weight[: w.shape[0]] = w
                head.bias[: w.shape[0]] = old.bias
            self.heads[task] = head.train(old.training)
            for key, param in head.named_parameters():
                self.own(task, f"head.{key}", param)
        spec.labels.extend(new_labels)

    def store(self, method: str, make: Callable[[], M]) -> M:
        """The module in which ``method`` keeps its tasks' tensors outside the base's layers, made on first use.

        Kept in the bank's module tree, so ``.to()`` and the bank's ``state_dict()`` see it (soft prompts and
        prefixes live here; linear-layer methods keep theirs in their wrappers).
        """
        if method not in self.stores:
            self.stores[method] = make()
        return cast(M, self.stores[method])  # what make() built for this method (ModuleDict types it Module)

    def own(self, task: str, key: str, param: nn.Parameter) -> None:
        """Record that ``param`` belongs to ``task`` under the public state-dict ``key``."""
        param.requires_grad_(True)
        self._owned[task][key] = param

    def disown(self, task: str, key: str) -> None:
        """Forget ``key`` of ``task`` (a method replacing its training-time tensors, e.g. by folding)."""
        del self._owned[task][key]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """Exactly the task's own trainable parameters, by public key."""
        self.spec(task)
        return self._owned[task]

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return {
            k: p.detach().to("cpu", copy=True).contiguous() for k, p in self.task_parameters(task).items()
        }

    def load_task_state_dict(self, task: str, state: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into a task's parameters; every key and shape must match."""
        own = self.task_parameters(task)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"the saved weights of task '{task}' do not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; was it trained on another base model or config?"
            )
        with torch.no_grad():
            for key, param in own.items():
                if param.shape != state[key].shape:
                    raise ConfigError(
                        f"saved tensor {key} of task '{task}' has shape {tuple(state[key].shape)} but the model "
                        f"expects {tuple(param.shape)}; was it trained on another base model?"
                    )
                param.copy_(state[key])

    def output_layer_names(self) -> set[str]:
        """Linear layers that methods never wrap: the LM head."""
        head = (
            self.base.model.get_output_embeddings()
            if hasattr(self.base.model, "get_output_embeddings")
            else None
        )
        return {n for n, m in self.base.model.named_modules() if head is not None and m is head}

    def spec(self, task: str) -> TaskSpec:
        """The task's spec; an unknown task is an error naming the bank's tasks."""
        if task not in self.tasks:
            known = ", ".join(self.tasks) or "none"
            raise ConfigError(f"unknown task '{task}'; tasks in this bank: {known}")
        return self.tasks[task]

    def task_ids(self, task: str, batch: int) -> torch.Tensor:
        self.spec(task)
        return torch.full((batch,), self.slots.index(task), dtype=torch.long, device=self.base.device)

    # ---- merge / disable ---------------------------------------------------------------------------
    def merge(self, task: str) -> None:
        """Fold a task into the base weights (LoRA, (IA)^3: single-task deployment); :meth:`unmerge` undoes it."""
        method = get_method(self.spec(task).method)
        if method.merge is None:
            foldable = ", ".join(n for n, m in METHODS.items() if m.merge is not None)
            raise ConfigError(
                f"'{task}' uses {method.name}, which cannot be folded into the base weights; "
                f"methods that can: {foldable}"
            )
        if len(self.tasks) > 1:
            raise ConfigError(
                f"merging '{task}' would change the base under the bank's other tasks; merge in a bank of one task"
            )
        if self.base.quantize:
            raise ConfigError(
                f"cannot merge '{task}' into a base quantized to {self.base.quantize} (its weights are stored in "
                "4 or 8 bits); drop --quantize (load the base unquantized) to merge"
            )
        method.merge(self, task)

    def unmerge(self, task: str) -> None:
        method = get_method(self.spec(task).method)
        if method.unmerge is not None:
            method.unmerge(self, task)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the frozen base with every adapter off (the reference model of DPO and PPO)."""
        previous, self.routing.disabled = self.routing.disabled, True
        try:
            yield
        finally:
            self.routing.disabled = previous

    @contextmanager
    def routed(self, task_ids: torch.Tensor) -> Iterator[None]:
        """Route the rows of the forwards inside to their tasks (re-entrant: an inner routing is undone)."""
        previous = self.routing.row_tasks, self.routing.single
        self.routing.set_rows(task_ids)
        try:
            yield
        finally:
            self.routing.row_tasks, self.routing.single = previous

    # ---- forward -----------------------------------------------------------------------------------
    def _input_methods(self) -> list[Any]:
        """The methods of the bank's tasks that contribute to the model's inputs (prompts, prefixes)."""
        if self._inputs_version != self.routing.version:
            names = sorted({spec.method for spec in self.tasks.values()})
            self._inputs = [m for m in map(get_method, names) if m.inputs is not None]
            self._inputs_version = self.routing.version
        return self._inputs

    def model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor
    ) -> tuple[dict[str, Any], int]:
        """The base model's inputs for a batch, and the number of virtual positions prepended to the text.

        Input-side methods contribute through their ``inputs`` hook (see :class:`ModelInputs`): soft prompts
        as virtual token embeddings before the text (Lester et al. 2021, section 2), prefixes as a cache that
        already holds their key/value positions (Li & Liang 2021); each right-aligned to the longest in the
        batch, the positions before a shorter one (or before the text of a row with none) masked. A cache's
        positions come first in the attention mask (for T5: in the decoder's, under the private key
        ``_prefix_mask`` that :meth:`run` turns into ``decoder_attention_mask``).

        Position ids count only unmasked positions, so every row sees exactly the positions it would see
        alone: with a prefix of n, its text starts at position n, as in the peft package. Decoders always get
        them (a left-padded row's text starts at position 0, as ``generate`` counts).
        """
        state = ModelInputs(input_ids, attention_mask, task_ids)
        if not self.routing.disabled:
            for method in self._input_methods():
                method.inputs(self, state)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        width = 0 if state.virtual is None else state.virtual.shape[1]
        if state.virtual is not None:
            embeds = self.base.model.get_input_embeddings()(input_ids)  # (B, L, d)
            assert state.virtual_mask is not None
            inputs = {
                "inputs_embeds": torch.cat([state.virtual.to(embeds.dtype), embeds], dim=1),
                "attention_mask": torch.cat([state.virtual_mask.to(attention_mask.dtype), attention_mask], 1),
            }
        cached = 0
        if state.cache is not None:
            assert state.cache_mask is not None
            cache_mask = state.cache_mask.to(attention_mask.dtype)
            inputs["cache"] = state.cache
            if self.base.arch == "seq2seq":
                inputs["_prefix_mask"] = cache_mask
            else:
                inputs["attention_mask"] = torch.cat([cache_mask, inputs["attention_mask"]], dim=1)
                cached = cache_mask.shape[1]
        if self.base.arch == "decoder" or (self.base.arch == "encoder" and (width or cached)):
            full = inputs["attention_mask"]  # T5's positions are relative: none to give
            inputs["position_ids"] = (full.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        return inputs, width

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        *,
        backbone: bool = False,
        decoder_length: int | None = None,
        **model_kwargs: Any,
    ) -> Routed:
        """One routed forward of the base: the rows' tasks applied at every hook point.

        ``backbone``: the model without its LM head (hidden states). ``decoder_length``: for seq2seq, the
        length of the decoder input (``labels`` or ``decoder_input_ids`` in ``model_kwargs``), for the
        decoder mask of prefix rows. Other keywords go to the model (``labels``, ``use_cache``,
        ``logits_to_keep``, ``output_hidden_states``). The output's per-position tensors include the
        ``width`` virtual positions before the text.
        """
        packed = model_kwargs.pop("position_ids", None)  # a packed row (encode.pack): its own positions
        with self.routed(task_ids):
            inputs, width = self.model_inputs(input_ids, attention_mask, task_ids)
            if packed is not None:
                if self.base.arch != "decoder":
                    raise ConfigError(
                        "--packing packs a decoder's examples in one row; an encoder-decoder's targets are its "
                        "decoder's own rows: drop --packing"
                    )
                if width or "cache" in inputs:
                    raise ConfigError(
                        "--packing puts several examples in one row, but this task's method adds virtual "
                        "positions to every example (prompt or prefix tuning); drop --packing"
                    )
                # the model masks by segment: transformers reads packed sequences from restarting position ids
                # when there is neither a 2D mask nor a cache (so none may be made: use_cache off)
                inputs["position_ids"], inputs["attention_mask"] = packed, None
                model_kwargs["use_cache"] = False
            prefix_mask = inputs.pop("_prefix_mask", None)
            if (
                prefix_mask is not None
            ):  # T5 with prefixes: the decoder's mask is [prefix mask; its own positions]
                length = decoder_length or 1
                ones = prefix_mask.new_ones(input_ids.shape[0], length)
                inputs["decoder_attention_mask"] = torch.cat([prefix_mask, ones], dim=1)
            model = self.base.backbone() if backbone else self.base.model
            out = model(**inputs, **model_kwargs)
        return Routed(out, width, inputs["attention_mask"])

    def virtual_positions(self, task: str) -> int:
        """Positions the task's rows occupy before their text (soft prompt tokens, prefix positions; a stacked
        task's components' too)."""
        self.spec(task)
        total = 0
        for member in self.routing.chain(task):
            method = get_method(self.tasks[member].method)
            total += method.positions(self, member) if method.positions is not None else 0
        return total

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor
    ) -> torch.Tensor:
        """The last hidden states of the text positions (B, L, d); for seq2seq, the first decoder step (B, 1, d)."""
        if self.base.arch == "seq2seq":
            start = self.base.model.config.decoder_start_token_id or 0
            decoder_input_ids = torch.full(
                (input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device
            )
            routed = self.run(
                input_ids,
                attention_mask,
                task_ids,
                decoder_input_ids=decoder_input_ids,
                output_hidden_states=True,
            )
            return routed.out.decoder_hidden_states[-1]
        routed = self.run(input_ids, attention_mask, task_ids, backbone=True)
        return routed.out.last_hidden_state[:, routed.width :]

    def classify(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        pooled_out: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Logits (B, C) with C the largest label count among the rows' tasks; padding columns are -inf.

        Rows of a task whose method scores labels itself (prompting) get that method's scores, not a head's.

        ``pooled_out``: when a list is given, one float32 tensor (B, H) is appended to it, each row the pooled
        vector its head read (drift monitoring takes its features from the forward that served the row, so
        it costs no second forward); rows scored by their method (no head) are NaN, and None is appended
        when no row had a head. Without the list nothing extra is computed or kept.
        """
        if any(get_method(spec.method).score is not None for spec in self.tasks.values()):
            scored = self._classify_scored(input_ids, attention_mask, task_ids, pooled_out)
            if scored is not None:
                return scored
        with self.routed(task_ids):
            hidden = self.hidden_states(input_ids, attention_mask, task_ids)
            single = self.routing.single
        slots = self.slots
        present = [slots.index(single)] if single is not None else sorted({int(t) for t in task_ids.tolist()})
        width = max(len(self.tasks[slots[s]].labels) for s in present)
        logits = hidden.new_full((input_ids.shape[0], width), float("-inf"), dtype=torch.float32)
        features = (
            None
            if pooled_out is None
            else hidden.new_full((input_ids.shape[0], hidden.shape[-1]), float("nan"), dtype=torch.float32)
        )
        for slot in present:  # heads are tiny; pooling differs per task
            task = slots[slot]
            rows = (task_ids == slot).nonzero(as_tuple=True)[0] if len(present) > 1 else slice(None)
            mask = attention_mask[rows]
            pooled = pool(hidden[rows], mask, self.tasks[task].pooling or "mean", self.base.arch)
            if features is not None:
                features[rows] = pooled.detach().float()
            head = cast(nn.Linear, self.heads[task])  # add_task makes every head (ModuleDict types it Module)
            out = head(pooled.to(head.weight.dtype))
            if len(present) == 1:
                logits = (
                    out
                    if out.shape[1] == width
                    else F.pad(out, (0, width - out.shape[1]), value=float("-inf"))
                )
            else:
                logits[rows, : out.shape[1]] = out
        if pooled_out is not None:
            pooled_out.append(features)
        return logits

    def _classify_scored(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_ids: torch.Tensor,
        pooled_out: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor | None:
        """Logits of a batch with rows whose method has ``score``: those rows by it, the rest by their heads."""
        slots = self.slots
        present = sorted({int(t) for t in task_ids.tolist()})
        scorers = {s: get_method(self.tasks[slots[s]].method).score for s in present}
        if all(score is None for score in scorers.values()):
            return None
        width = max(len(self.tasks[slots[s]].labels) for s in present)
        logits = torch.full((input_ids.shape[0], width), float("-inf"), device=input_ids.device)
        headed = torch.zeros_like(task_ids, dtype=torch.bool)
        for slot, score in scorers.items():
            rows = (task_ids == slot).nonzero(as_tuple=True)[0]
            if score is None:
                headed[rows] = True
                continue
            out = score(self, slots[slot], input_ids[rows], attention_mask[rows])
            logits[rows, : out.shape[1]] = out.float()
        inner: list[torch.Tensor | None] | None = None if pooled_out is None else []
        if headed.any():  # rows of tasks with heads: no scored row among them, so this returns at the heads
            rows = headed.nonzero(as_tuple=True)[0]
            out = self.classify(input_ids[rows], attention_mask[rows], task_ids[rows], inner)
            logits[rows, : out.shape[1]] = out.float()
        if pooled_out is not None:
            headed_rows = inner[0] if inner else None
            features = None
            if headed_rows is not None:
                features = headed_rows.new_full((input_ids.shape[0], headed_rows.shape[1]), float("nan"))
                features[headed] = headed_rows
            pooled_out.append(features)
        return logits

    def target_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of a generation batch aligned position by position: each logit row predicts the
        label beside it (a decoder's shifted by one past its virtual tokens; an encoder-decoder's as they are)."""
        labels = batch["labels"]
        if self.base.arch == "seq2seq":
            logits = self.run(
                batch["input_ids"],
                batch["attention_mask"],
                batch["task_ids"],
                labels=labels,
                decoder_length=labels.shape[1],
            ).out.logits
            return logits, labels
        if "position_ids" in batch:  # a packed row (encode.pack)
            routed = self.run(
                batch["input_ids"],
                batch["attention_mask"],
                batch["task_ids"],
                position_ids=batch["position_ids"],
            )
        else:
            routed = self.run(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        return routed.out.logits[:, routed.width : -1], labels[:, 1:]

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token NLL and token count over the target tokens (labels != -100) of a generation batch;
        on an encoder, of a masked-LM batch (each row through its task's MLM head: multitune.domain)."""
        if self.base.arch == "encoder":
            from multitune.domain import masked_lm_loss

            return masked_lm_loss(self, batch)
        logits, labels = self.target_logits(batch)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return nll, (labels != -100).sum()

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """Generated token ids; decoders return only the new tokens (inputs must be left-padded).

        With prefixes, ``generate`` is given a cache that already holds n positions; it expects the
        first n tokens of its input to be the ones cached, so n placeholder tokens (or zero embeddings)
        go first and are cut from the output.
        """
        tokenizer = self.base.tokenizer
        pad = tokenizer.pad_token_id
        kwargs.setdefault("pad_token_id", pad)
        batch = input_ids.shape[0]
        with self.routed(task_ids):
            inputs, width = self.model_inputs(input_ids, attention_mask, task_ids)
            inputs.pop("position_ids", None)  # generate derives positions from the mask, step by step
            cached = inputs["cache"].get_seq_length() if "cache" in inputs else 0
            if self.base.arch == "seq2seq" and cached:
                start = self.base.model.config.decoder_start_token_id or 0
                inputs["decoder_input_ids"] = torch.cat(
                    [
                        torch.full((batch, cached), pad, dtype=torch.long, device=input_ids.device),
                        torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device),
                    ],
                    dim=1,
                )
                prefix_mask = inputs.pop("_prefix_mask")
                inputs["decoder_attention_mask"] = torch.cat(
                    [prefix_mask, prefix_mask.new_ones(batch, 1)], dim=1
                )
            elif cached and "input_ids" in inputs:
                placeholder = torch.full((batch, cached), pad, dtype=torch.long, device=input_ids.device)
                inputs["input_ids"] = torch.cat([placeholder, input_ids], dim=1)
            elif cached:
                embeds = inputs["inputs_embeds"]
                inputs["inputs_embeds"] = torch.cat(
                    [embeds.new_zeros(batch, cached, embeds.shape[-1]), embeds], dim=1
                )
            # A decoder's or seq2seq model's class mixes in GenerationMixin; without return_dict_in_generate
            # (no caller passes it) generate returns the token ids.
            model = cast("GenerationMixin", self.base.model)
            out = cast(torch.Tensor, model.generate(**inputs, **kwargs))
        if self.base.arch == "seq2seq":
            return out[:, cached:]
        if "input_ids" in inputs:
            return out[:, inputs["input_ids"].shape[1] :]
        return out  # from inputs_embeds, a decoder returns only the new tokens

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch: mean cross-entropy over rows (classification) or target tokens."""
        if "class_labels" in batch:
            logits = self.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
            return F.cross_entropy(logits, batch["class_labels"])
        nll, count = self.lm_loss(batch)
        return nll / count.clamp(min=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling, arch: str) -> torch.Tensor:
    """One vector (B, d) per row from hidden states (B, L, d) and the attention mask (B, L)."""
    if arch == "seq2seq" or hidden.shape[1] == 1:
        return hidden[:, -1]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":  # the last real token, whichever side the padding is on
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
