"""Prefix tuning: per-layer trainable key/value prefixes for attention (Li & Liang 2021).

A task t owns, for each attention layer, n virtual key and value vectors per head. They enter the model
through its Cache API: before the forward, the bank fills a ``DynamicCache`` with each row's prefixes, so
every attention layer attends to [prefix keys; text keys] as if n tokens had come before the text, and the
attention mask carries the prefix positions (masked where a row's task has a shorter prefix or none).

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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from multitune.errors import ConfigError
from multitune.methods import Method, register

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix length n (virtual tokens per layer)"})
    projection: bool = field(default=True, metadata={
        "help": "train through the reparameterisation MLP (folded into plain prefixes when training ends)"})
    projection_hidden: int | None = field(default=None, metadata={
        "help": "hidden size of the reparameterisation MLP (default: the model's hidden size)"})

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"prefix num_virtual_tokens must be >= 1 (got {self.num_virtual_tokens}); "
                            "try --prefix-num-virtual-tokens 20")
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
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads_q
    return Geometry(layers, heads, head_dim)


class PrefixEncoder(nn.Module):
    """One task's prefixes: a plain (n, width) tensor, or E (n, d) through the reparameterisation MLP."""

    def __init__(self, n: int, hidden: int, width: int, projection_hidden: int | None, projection: bool,
                 device: torch.device) -> None:
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(n, hidden, device=device) * hidden ** -0.5)
            inner = projection_hidden or hidden
            self.mlp = nn.Sequential(nn.Linear(hidden, inner, device=device), nn.Tanh(),
                                     nn.Linear(inner, width, device=device))
            # A small last layer: the prefixes start near zero keys and values, a mild perturbation.
            with torch.no_grad():
                self.mlp[2].weight.mul_(0.1)
                self.mlp[2].bias.zero_()
        else:
            self.embeddings = nn.Parameter(torch.randn(n, width, device=device) * 0.02)

    @property
    def length(self) -> int:
        return (self.embedding if self.projection else self.embeddings).shape[0]

    def forward(self) -> torch.Tensor:
        """The prefixes (n, width)."""
        return self.mlp(self.embedding) if self.projection else self.embeddings


def attach(bank: MultiTaskModel, task: str, config: PrefixConfig) -> None:
    base = bank.base
    limit = getattr(base.model.config, "max_position_embeddings", None) or getattr(base.model.config, "n_positions", None)
    if limit is not None and config.num_virtual_tokens >= limit:
        raise ConfigError(f"a prefix of {config.num_virtual_tokens} tokens leaves no room for text in a context of "
                          f"{limit} positions; use --prefix-num-virtual-tokens below {limit}")
    geo = geometry(bank)
    encoder = PrefixEncoder(config.num_virtual_tokens, base.hidden_size, geo.width, config.projection_hidden,
                            config.projection, base.device)
    bank.prefixes[task] = encoder
    for key, param in encoder.named_parameters():
        bank.own(task, f"prefix.{key}", param)


def detach(bank: MultiTaskModel, task: str) -> None:
    del bank.prefixes[task]


def fold(bank: MultiTaskModel, task: str) -> None:
    """Replace a task's embedding + MLP by the plain prefixes they give (for saving and serving)."""
    encoder = bank.prefixes[task]
    if not encoder.projection:
        return
    with torch.no_grad():
        plain = encoder().detach().clone()
    folded = PrefixEncoder(plain.shape[0], bank.base.hidden_size, plain.shape[1], None, False, plain.device)
    with torch.no_grad():
        folded.embeddings.copy_(plain)
    bank.prefixes[task] = folded
    for key in [k for k in bank.task_parameters(task) if k.startswith("prefix.")]:
        bank.disown(task, key)
    bank.own(task, "prefix.embeddings", folded.embeddings)
    bank.tasks[task].config["projection"] = False


def prefix_cache(bank: MultiTaskModel, task_ids: torch.Tensor, dtype: torch.dtype) -> tuple[Any, torch.Tensor] | None:
    """A cache holding each row's prefixes, right-aligned to the longest, and the prefix mask (B, W).

    None when no row of the batch has a prefix.
    """
    from transformers import DynamicCache, EncoderDecoderCache

    slots = bank.slots
    lengths_by_slot = torch.tensor([bank.prefixes[t].length if t in bank.prefixes else 0 for t in slots])
    lengths = lengths_by_slot[task_ids.cpu()].to(task_ids.device)
    width = int(lengths.max()) if lengths.numel() else 0
    if width == 0:
        return None
    geo = geometry(bank)
    present = sorted({int(s) for s in task_ids.tolist()})
    ref = next(next(iter(bank.prefixes.values())).parameters())
    rows = []
    for slot in present:  # only the slots in the batch are stacked: P <= B of them, however many tasks
        task = slots[slot]
        p = bank.prefixes[task]() if task in bank.prefixes else ref.new_zeros(0, geo.width)
        rows.append(F.pad(p, (0, 0, width - p.shape[0], 0)))
    where = torch.zeros(len(slots), dtype=torch.long)
    where[present] = torch.arange(len(present))
    stack = torch.stack(rows)[where.to(task_ids.device)[task_ids]].to(dtype)  # (B, W, layers * 2 * kv_dim)
    batch = stack.shape[0]
    kv = stack.view(batch, width, geo.layers * 2, geo.heads, geo.head_dim).permute(2, 0, 3, 1, 4)
    cache = DynamicCache()
    for layer in range(geo.layers):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    if bank.base.arch == "seq2seq":
        cache = EncoderDecoderCache(cache, DynamicCache())
    positions = torch.arange(width, device=task_ids.device)
    mask = (positions >= width - lengths[:, None]).long()
    return cache, mask


register(Method(name="prefix", config_class=PrefixConfig, attach=attach, detach=detach,
                summary="trainable key/value prefixes in every attention layer (Li & Liang 2021)",
                default_learning_rate=1e-2, fold=fold))
