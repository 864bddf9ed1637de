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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.models import Base
from multitune.routing import Routing

TaskKind = Literal["classification", "generation"]
Pooling = Literal["mean", "cls", "last"]
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
        self.prompts = nn.ParameterDict()  # task -> (n, d) virtual token embeddings (prompt tuning)
        self.prefixes = nn.ModuleDict()  # task -> PrefixEncoder: per-layer key/value prefixes (prefix tuning)
        self.tasks: dict[str, TaskSpec] = {}
        self.routing = Routing()
        self._owned: dict[str, dict[str, nn.Parameter]] = {}
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
    ) -> TaskSpec:
        """Attach a new task's parameters (and its head, for classification); other tasks are untouched."""
        if not _TASK_NAME.match(name):
            raise ConfigError(f"task name '{name}' must be 1-64 letters, digits, '_' or '-', starting with a letter or digit")
        if name in self.tasks:
            raise ConfigError(f"task '{name}' is already in the bank; remove it first or choose another name")
        spec_method = get_method(method)
        config = config if config is not None else spec_method.config_class()
        problems = config.validate()
        if problems:
            raise ConfigError("; ".join(problems))
        if kind == "classification" and len(labels or []) < 2:
            raise ConfigError(f"classification task '{name}' needs at least 2 labels (got {labels or []})")
        if kind == "generation" and self.base.arch == "encoder":
            raise ConfigError(
                f"generation needs a causal LM or a seq2seq model; {self.base.source} is an encoder. "
                "Use a decoder such as smollm2-135m, or a classification task"
            )
        spec = TaskSpec(name, kind, method, asdict(config), list(labels or []),
                        (pooling or default_pooling(self.base)) if kind == "classification" else None)
        self._owned[name] = {}
        self.tasks[name] = spec  # before attach: a method may read the task's labels (prompt init)
        try:
            spec_method.attach(self, name, config)
        except Exception:
            self._owned.pop(name, None)
            self.tasks.pop(name, None)
            raise
        if kind == "classification" and spec_method.score is None:  # a method that scores labels has no head
            head = nn.Linear(self.base.hidden_size, len(labels or []), device=self.base.device)
            self.heads[name] = head
            for key, param in head.named_parameters():
                self.own(name, f"head.{key}", param)
        self.routing.slots.append(name)
        self.routing.version += 1
        return spec

    def remove_task(self, name: str) -> None:
        spec = self._spec(name)
        get_method(spec.method).detach(self, name)
        if name in self.heads:
            del self.heads[name]
        del self.tasks[name], self._owned[name]
        self.routing.slots.remove(name)
        self.routing.version += 1

    def own(self, task: str, key: str, param: nn.Parameter) -> None:
        """Record that ``param`` belongs to ``task`` under the public state-dict ``key``."""
        param.requires_grad_(True)
        self._owned[task][key] = param

    def disown(self, task: str, key: str) -> None:
        """Forget ``key`` of ``task`` (a method replacing its training-time tensors, e.g. by folding)."""
        del self._owned[task][key]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """Exactly the task's own trainable parameters, by public key."""
        self._spec(task)
        return self._owned[task]

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in self.task_parameters(task).items()}

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
        head = self.base.model.get_output_embeddings() if hasattr(self.base.model, "get_output_embeddings") else None
        return {n for n, m in self.base.model.named_modules() if head is not None and m is head}

    def _spec(self, task: str) -> TaskSpec:
        if task not in self.tasks:
            known = ", ".join(self.tasks) or "none"
            raise ConfigError(f"unknown task '{task}'; tasks in this bank: {known}")
        return self.tasks[task]

    def task_ids(self, task: str, batch: int) -> torch.Tensor:
        self._spec(task)
        return torch.full((batch,), self.slots.index(task), dtype=torch.long, device=self.base.device)

    # ---- merge / disable ---------------------------------------------------------------------------
    def merge(self, task: str) -> None:
        """Fold a task into the base weights (LoRA, (IA)^3: single-task deployment); :meth:`unmerge` undoes it."""
        method = get_method(self._spec(task).method)
        if method.merge is None:
            foldable = ", ".join(n for n, m in METHODS.items() if m.merge is not None)
            raise ConfigError(f"'{task}' uses {method.name}, which cannot be folded into the base weights; "
                              f"methods that can: {foldable}")
        if len(self.tasks) > 1:
            raise ConfigError(f"merging '{task}' would change the base under the bank's other tasks; merge in a bank of one task")
        method.merge(self, task)

    def unmerge(self, task: str) -> None:
        method = get_method(self._spec(task).method)
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
        self.routing.set_rows(task_ids)
        try:
            yield
        finally:
            self.routing.clear()

    # ---- forward -----------------------------------------------------------------------------------
    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     task_ids: torch.Tensor) -> tuple[dict[str, Any], int]:
        """The base model's inputs for a batch, and the number of virtual positions prepended to the text.

        Rows whose task has a soft prompt get its virtual tokens before their text (Lester et al. 2021,
        section 2). Prompts are right-aligned to the longest one in the batch; the positions before a
        shorter prompt (or before the text of a row with none) are masked.

        Rows whose task has prefixes (Li & Liang 2021) get them through the model's ``cache`` input, right-aligned
        the same way, with the prefix positions in front of the attention mask (for T5: of the decoder's,
        under the private key ``_prefix_mask`` that the callers turn into ``decoder_attention_mask``).

        Position ids count only unmasked positions, so every row sees exactly the positions it would see
        alone: with a prefix of n, its text starts at position n, as in the peft package.
        """
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.routing.disabled or not (self.prompts or self.prefixes):
            return inputs, 0
        width = 0
        if self.prompts:
            slots = self.slots
            sizes = torch.tensor([self.prompts[t].shape[0] if t in self.prompts else 0 for t in slots])
            lengths = sizes[task_ids.cpu()].to(input_ids.device)  # (B,)
            width = int(lengths.max()) if lengths.numel() else 0
        if width:
            embeds = self.base.model.get_input_embeddings()(input_ids)  # (B, L, d)
            virtual = self._prompt_stack(task_ids, width).to(embeds.dtype)  # (B, width, d)
            positions = torch.arange(width, device=input_ids.device)
            virtual_mask = (positions >= width - lengths[:, None]).to(attention_mask.dtype)  # (B, width)
            inputs = {"inputs_embeds": torch.cat([virtual, embeds], dim=1),
                      "attention_mask": torch.cat([virtual_mask, attention_mask], dim=1)}
        prefix = None
        if self.prefixes:
            from multitune.methods.prefix import prefix_cache

            prefix = prefix_cache(self, task_ids, self.base.model.dtype)
        prefix_mask = attention_mask.new_zeros(input_ids.shape[0], 0)
        if prefix is not None:
            inputs["cache"], prefix_mask = prefix[0], prefix[1].to(attention_mask.dtype)
            if self.base.arch == "seq2seq":
                inputs["_prefix_mask"] = prefix_mask
                prefix_mask = prefix_mask[:, :0]
            else:
                inputs["attention_mask"] = torch.cat([prefix_mask, inputs["attention_mask"]], dim=1)
        if self.base.arch != "seq2seq" and (width or prefix is not None):  # T5's positions are relative
            full = inputs["attention_mask"]
            inputs["position_ids"] = (full.cumsum(-1) - 1).clamp(min=0)[:, prefix_mask.shape[1]:]
        return inputs, width

    @staticmethod
    def _decoder_mask(inputs: dict[str, Any], batch: int, length: int, device: torch.device) -> None:
        """T5 with prefixes: the decoder's mask is [prefix mask; ones over its own positions]."""
        prefix_mask = inputs.pop("_prefix_mask", None)
        if prefix_mask is not None:
            ones = torch.ones(batch, length, dtype=prefix_mask.dtype, device=device)
            inputs["decoder_attention_mask"] = torch.cat([prefix_mask, ones], dim=1)

    def _prompt_stack(self, task_ids: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width, d): each row's prompt right-aligned, zeros for rows of tasks without one.

        Only the slots present in the batch are stacked (P <= B of them, however many tasks the bank
        holds), then gathered per row.
        """
        slots = self.slots
        present = sorted(set(task_ids.tolist()))
        ref = next(iter(self.prompts.values()))
        rows = []
        for slot in present:
            p = self.prompts[slots[slot]] if slots[slot] in self.prompts else ref.new_zeros(0, ref.shape[1])
            rows.append(F.pad(p, (0, 0, width - p.shape[0], 0)) if p.shape[0] < width else p[-width:])
        where = torch.zeros(len(slots), dtype=torch.long)
        where[present] = torch.arange(len(present))
        return torch.stack(rows)[where.to(task_ids.device)[task_ids]]  # (P, width, d) -> (B, width, d)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      task_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states of the text positions (B, L, d); for seq2seq, the first decoder step (B, 1, d)."""
        inputs, width = self.model_inputs(input_ids, attention_mask, task_ids)
        if self.base.arch == "seq2seq":
            start = self.base.model.config.decoder_start_token_id or 0
            decoder_input_ids = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
            self._decoder_mask(inputs, input_ids.shape[0], 1, input_ids.device)
            out = self.base.model(**inputs, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
            return out.decoder_hidden_states[-1]
        return self.base.backbone()(**inputs).last_hidden_state[:, width:]

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) with C the largest label count among the rows' tasks; padding columns are -inf.

        Rows of a task whose method scores labels itself (prompting) get that method's scores, not a head's.
        """
        if any(get_method(spec.method).score is not None for spec in self.tasks.values()):
            scored = self._classify_scored(input_ids, attention_mask, task_ids)
            if scored is not None:
                return scored
        with self.routed(task_ids):
            hidden = self.hidden_states(input_ids, attention_mask, task_ids)
            single = self.routing.single
        slots = self.slots
        present = [slots.index(single)] if single is not None else sorted({int(t) for t in task_ids.tolist()})
        width = max(len(self.tasks[slots[s]].labels) for s in present)
        logits = hidden.new_full((input_ids.shape[0], width), float("-inf"), dtype=torch.float32)
        for slot in present:  # heads are tiny; pooling differs per task
            task = slots[slot]
            rows = (task_ids == slot).nonzero(as_tuple=True)[0] if len(present) > 1 else slice(None)
            mask = attention_mask[rows]
            pooled = pool(hidden[rows], mask, self.tasks[task].pooling or "mean", self.base.arch)
            head = self.heads[task]
            out = head(pooled.to(head.weight.dtype))
            if len(present) == 1:
                logits = out if out.shape[1] == width else F.pad(out, (0, width - out.shape[1]), value=float("-inf"))
            else:
                logits[rows, : out.shape[1]] = out
        return logits

    def _classify_scored(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         task_ids: torch.Tensor) -> torch.Tensor | None:
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
        if headed.any():  # rows of tasks with heads: no scored row among them, so this returns at the heads
            rows = headed.nonzero(as_tuple=True)[0]
            out = self.classify(input_ids[rows], attention_mask[rows], task_ids[rows])
            logits[rows, : out.shape[1]] = out.float()
        return logits

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token NLL and token count over the target tokens (labels != -100) of a generation batch."""
        labels = batch["labels"]
        with self.routed(batch["task_ids"]):
            inputs, width = self.model_inputs(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
            if self.base.arch == "seq2seq":
                self._decoder_mask(inputs, labels.shape[0], labels.shape[1], labels.device)
                logits = self.base.model(**inputs, labels=labels).logits
            else:
                logits = self.base.model(**inputs).logits[:, width:]
                logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
        return nll, (labels != -100).sum()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor,
                 **kwargs: Any) -> torch.Tensor:
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
                    [torch.full((batch, cached), pad, dtype=torch.long, device=input_ids.device),
                     torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)], dim=1)
                self._decoder_mask(inputs, batch, 1, input_ids.device)
            elif cached and "input_ids" in inputs:
                placeholder = torch.full((batch, cached), pad, dtype=torch.long, device=input_ids.device)
                inputs["input_ids"] = torch.cat([placeholder, input_ids], dim=1)
            elif cached:
                embeds = inputs["inputs_embeds"]
                inputs["inputs_embeds"] = torch.cat([embeds.new_zeros(batch, cached, embeds.shape[-1]), embeds], dim=1)
            out = self.base.model.generate(**inputs, **kwargs)
        if self.base.arch == "seq2seq":
            return out[:, cached:]
        if "input_ids" in inputs:
            return out[:, inputs["input_ids"].shape[1]:]
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
