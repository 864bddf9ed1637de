"""Prefix tuning: per-layer trainable key/value prefixes for attention (Li & Liang 2021).

A task t owns, for each attention layer, n virtual key and value vectors per head. They enter the model
through its Cache API: before the forward, the ``inputs`` hook fills a ``DynamicCache`` with each row's
prefixes, so every attention layer attends to [prefix keys; text keys] as if n tokens had come before the
text, and the attention mask carries the prefix positions (masked where a row's task has a shorter prefix or
none).

Layout (the peft package's, so that export is a rename): one tensor (n, num_layers * 2 * kv_dim) per task,
``kv_dim = kv_heads * head_dim``; for layer i, the key is slice 2i and the value slice 2i + 1 of the
middle dimension viewed as (num_layers * 2, kv_heads, head_dim).

Reparameterisation (section 4.3 of the paper): optimising the prefixes directly is unstable, so during
training P = MLP(E), with E (n, d) an embedding and MLP = Linear(d, h) -> tanh -> Linear(h, layers * 2 * kv_dim).
When training ends, :func:`fold` replaces E and the MLP by the plain prefixes they produce: what is saved
and served is the (n, layers * 2 * kv_dim) tensor alone.

Where the prefixes go: decoder self-attention (Llama-like, GPT-2), encoder self-attention (BERT-like),
and the decoder self-attention of T5 (as the peft package's decoder cache; T5's encoder has no cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import Method, register
from multitune.methods.stack import SlotStack, Stack, join_right, slot_index
from multitune.routing import Routing

if TYPE_CHECKING:
    from multitune.bank import ModelInputs, MultiTaskModel


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "prefix length n (virtual tokens per layer)"}
    )
    projection: bool = field(
        default=True,
        metadata={
            "help": "train through the reparameterisation MLP (folded into plain prefixes when training ends)"
        },
    )
    projection_hidden: int | None = field(
        default=None,
        metadata={"help": "hidden size of the reparameterisation MLP (default: the model's hidden size)"},
    )

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(
                f"prefix num_virtual_tokens must be >= 1 (got {self.num_virtual_tokens}); "
                "try --prefix-num-virtual-tokens 20"
            )
        if self.projection_hidden is not None and self.projection_hidden < 1:
            problems.append(f"prefix projection_hidden must be >= 1 (got {self.projection_hidden})")
        return problems


@dataclass(frozen=True)
class Geometry:
    """Where prefixes go in a model: layers with a cache, key/value heads per layer, head size."""

    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:  # the last dimension of a prefix tensor
        return self.layers * 2 * self.heads * self.head_dim


def geometry(bank: MultiTaskModel) -> Geometry:
    config = bank.base.model.config
    if bank.base.arch == "seq2seq":
        layers = getattr(config, "num_decoder_layers", None) or config.num_layers
    else:
        layers = config.num_hidden_layers
    heads_q = config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or heads_q
    head_dim = (
        getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads_q
    )
    return Geometry(layers, heads, head_dim)


class PrefixEncoder(nn.Module):
    """One task's prefixes: a plain (n, width) tensor, or E (n, d) through the reparameterisation MLP."""

    def __init__(
        self,
        n: int,
        hidden: int,
        width: int,
        projection_hidden: int | None,
        projection: bool,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(n, hidden, device=device) * hidden**-0.5)
            inner = projection_hidden or hidden
            # Built in this order, first then last: a seed gives the same initial weights as it always did.
            first = nn.Linear(hidden, inner, device=device)
            last = nn.Linear(inner, width, device=device)
            self.mlp = nn.Sequential(first, nn.Tanh(), last)
            # A small last layer: the prefixes start near zero keys and values, a mild perturbation.
            with torch.no_grad():
                last.weight.mul_(0.1)
                last.bias.zero_()
        else:
            self.embeddings = nn.Parameter(torch.randn(n, width, device=device) * 0.02)

    @property
    def length(self) -> int:
        return (self.embedding if self.projection else self.embeddings).shape[0]

    def forward(self) -> torch.Tensor:
        """The prefixes (n, width)."""
        return self.mlp(self.embedding) if self.projection else self.embeddings


class PrefixStore(nn.Module):
    """Every prefix-tuned task's encoder, and their prefixes stacked for mixed batches.

    The stack holds the T tasks' prefixes (n, width) right-aligned to the longest, and one row of zeros last,
    which every slot without prefixes points to. Folded prefixes are plain tensors; while training, the
    stack runs each encoder's MLP at every forward (and gradients reach it).
    """

    def __init__(self, routing: Routing) -> None:
        super().__init__()
        self.routing = routing
        self.encoders = nn.ModuleDict()  # task -> PrefixEncoder
        self.stacked = SlotStack(
            routing, self._stack, lambda: (p for e in self.encoders.values() for p in e.parameters())
        )

    def _stack(self, present: set[str] | None) -> Stack | None:
        tasks = [t for t in self.routing.slots if t in self.encoders and (present is None or t in present)]
        if not tasks:
            return None
        prefixes = [self.encoders[t]() for t in tasks]
        longest = max(p.shape[0] for p in prefixes)
        ref = prefixes[0]
        rows = [F.pad(p, (0, 0, longest - p.shape[0], 0)) for p in prefixes] + [
            ref.new_zeros(longest, ref.shape[1])
        ]
        lengths = torch.tensor([p.shape[0] for p in prefixes] + [0], device=ref.device)
        where = slot_index(self.routing, tasks, ref.device)
        return Stack((torch.stack(rows), lengths), torch.where(where < 0, len(tasks), where))


def encoders(bank: MultiTaskModel) -> nn.ModuleDict:
    """task -> its :class:`PrefixEncoder`, for every prefix-tuned task of the bank."""
    return _store(bank).encoders


def _store(bank: MultiTaskModel) -> PrefixStore:
    return bank.store("prefix", lambda: PrefixStore(bank.routing))


def attach(bank: MultiTaskModel, task: str, config: PrefixConfig) -> None:
    base = bank.base
    limit = getattr(base.model.config, "max_position_embeddings", None) or getattr(
        base.model.config, "n_positions", None
    )
    if limit is not None and config.num_virtual_tokens >= limit:
        raise ConfigError(
            f"a prefix of {config.num_virtual_tokens} tokens leaves no room for text in a context of "
            f"{limit} positions; use --prefix-num-virtual-tokens below {limit}"
        )
    geo = geometry(bank)
    encoder = PrefixEncoder(
        config.num_virtual_tokens,
        base.hidden_size,
        geo.width,
        config.projection_hidden,
        config.projection,
        base.device,
    )
    store = _store(bank)
    store.encoders[task] = encoder
    store.stacked.invalidate()
    for key, param in encoder.named_parameters():
        bank.own(task, f"prefix.{key}", param)


def detach(bank: MultiTaskModel, task: str) -> None:
    store = _store(bank)
    del store.encoders[task]
    store.stacked.invalidate()


def fold(bank: MultiTaskModel, task: str) -> None:
    """Replace a task's embedding + MLP by the plain prefixes they give (for saving and serving)."""
    store = _store(bank)
    encoder = store.encoders[task]
    if not encoder.projection:
        return
    with torch.no_grad():
        plain = encoder().detach().clone()
    folded = PrefixEncoder(plain.shape[0], bank.base.hidden_size, plain.shape[1], None, False, plain.device)
    with torch.no_grad():
        folded.embeddings.copy_(plain)
    store.encoders[task] = folded
    store.stacked.invalidate()
    for key in [k for k in bank.task_parameters(task) if k.startswith("prefix.")]:
        bank.disown(task, key)
    bank.own(task, "prefix.embeddings", folded.embeddings)
    bank.tasks[task].config["projection"] = False


def inputs(bank: MultiTaskModel, state: ModelInputs) -> None:
    """A cache holding each row's prefixes, right-aligned to the batch's longest, and the prefix mask (B, W).

    A stacked task's rows get their components' prefixes first, then their own, joined contiguous and
    right-aligned (:func:`~multitune.methods.stack.join_right`)."""
    from transformers import DynamicCache, EncoderDecoderCache

    blocks, masks = [], []
    for rows in _store(bank).stacked.levels(state.input_ids.shape[0], bank.base.model.dtype):
        if rows is None:
            continue
        stacked, lengths = rows.tensors  # (B, longest, layers * 2 * kv_dim), (B,)
        assert stacked is not None and lengths is not None
        width = int(lengths.max())
        if width == 0:
            continue
        blocks.append(stacked[:, stacked.shape[1] - width :])
        masks.append(torch.arange(width, device=lengths.device) >= width - lengths[:, None])
    if not blocks:
        return
    joined, mask = join_right(blocks, masks)
    geo = geometry(bank)
    batch, width = joined.shape[:2]
    kv = joined.reshape(batch, width, geo.layers * 2, geo.heads, geo.head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)  # (layers * 2, B, heads, W, head_dim)
    cache: DynamicCache | EncoderDecoderCache = DynamicCache()
    for layer in range(geo.layers):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    if bank.base.arch == "seq2seq":
        cache = EncoderDecoderCache(cache, DynamicCache())
    state.add_cache(cache, mask)


def positions(bank: MultiTaskModel, task: str) -> int:
    return cast(PrefixEncoder, encoders(bank)[task]).length  # (an nn.ModuleDict's items are typed Module)


MLP_LEARNING_RATE_SCALE = 0.1  # see learning_rate_scale


def learning_rate_scale(key: str) -> float:
    """The reparameterisation MLP learns at a tenth of the embedding's rate.

    AdamW moves every weight by about the learning rate per step whatever its gradient's size, and the MLP's
    last layer sums ``projection_hidden`` (hundreds of) such weights into each prefix value: at the rate that
    suits the embedding, the prefixes' keys grow within a hundred steps until every query attends to them
    alone, the text is no longer seen and the model answers one label (measured on SST-2: prefix RMS 3-14
    against 0.3-0.6 in runs that learn).
    """
    return MLP_LEARNING_RATE_SCALE if key.startswith("prefix.mlp.") else 1.0


def search(trial: Any) -> dict[str, Any]:
    return {"prefix.num_virtual_tokens": trial.suggest_categorical("prefix.num_virtual_tokens", [5, 10, 20])}


register(
    Method(
        name="prefix",
        config_class=PrefixConfig,
        attach=attach,
        detach=detach,
        summary="trainable key/value prefixes in every attention layer (Li & Liang 2021)",
        default_learning_rate=1e-2,
        fold=fold,
        inputs=inputs,
        positions=positions,
        search=search,
        learning_rate_scale=learning_rate_scale,
    )
)
