"""Self-supervised ("domain") adaptation on raw text: the objectives, the masked-LM head, masking and scores.

A domain task continues the base's pre-training on the user's unlabelled documents (Gururangan et al. 2020,
"Don't Stop Pretraining": domain-adaptive pre-training). Its adapter is an ordinary task of kind ``domain``
whose :attr:`~multitune.bank.TaskSpec.objective` says what it learned:

- ``clm`` (decoders): next-token NLL over every token of a document, ``-sum_t log p(x_t | x_<t)``, the
  generation path unchanged (:meth:`~multitune.bank.MultiTaskModel.lm_loss` with ``labels`` = the input ids).
- ``mlm`` (encoders): BERT's masked LM (Devlin et al. 2019, section 3.1 and appendix A.1): 15% of the
  non-special tokens are chosen; 80% of those become ``[MASK]``, 10% a random token, 10% stay; the loss is
  the cross-entropy of the chosen positions' original ids. Training masks afresh at every batch (RoBERTa's
  dynamic masking) from the loop's own RNG, so a resumed run draws the masks of an uninterrupted one; scoring
  masks each held-out document with a generator seeded by its index (:data:`EVAL_SEED`), so the bare base and
  the adapted task are scored on the same masked tokens.
- ``simcse`` (encoders): unsupervised SimCSE (Gao et al. 2021, section 3): each document is encoded twice in
  one forward, dropout the only augmentation; with mean-pooled z_i, z'_i (B, d) the loss is InfoNCE over
  the in-batch negatives, ``CE(cos(z_i, z'_j) / tau, j = i)``, tau = 0.05 (the paper's). Mean pooling, not
  the paper's [CLS] + MLP, since that is what this package's encoder classifiers read
  (:func:`multitune.bank.default_pooling`) and what sentence encoders such as MiniLM were trained with. It
  has no head. Held-out scores run the same loss with dropout on under a fixed seed: with dropout off the
  two views are identical and the loss would measure uniformity alone.

Seq2seq bases are refused: T5 was pre-trained by span corruption, which is not implemented.

The MLM head. A BERT-like checkpoint that has its pre-training head (``cls.predictions.*`` in BERT's
BertForMaskedLM, ``lm_head.*`` in RoBERTa's) starts from it: its loss before adaptation is the base's own.
Otherwise (all-MiniLM-L6-v2 is a plain BertModel) the head is made fresh, in BERT's shape: ``logits =
LN(act(W h + c)) E^T + b``, a trainable d x d projection W (+c) and LayerNorm, the decoder *tied* to the frozen
input embeddings E (V, d), and a bias b (V,). Tied, because a (V, d) decoder of its own would be 30522 x 384
= 11.7M parameters (half of MiniLM) learnt from scratch, and a head that strong would absorb the domain
signal that we want in the adapter; the head is thrown away downstream, the adapter is what is kept. W
starts as the identity and b at zero, so that the untrained head reads the base's last hidden states
against its own embeddings (a deterministic "before" that does not depend on a seed) rather than a random
projection. Its tensors are saved with the adapter as ``head.transform.dense.weight``,
``head.transform.LayerNorm.weight`` (and ``.bias``), ``head.bias``: BERT's names under ``head.``.

No flags for the masking rate or the temperature: :data:`MLM_PROBABILITY` and :data:`SIMCSE_TEMPERATURE`
are the papers' values, and the held-out scores must use the values the task trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from multitune.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel
    from multitune.data import Example
    from multitune.models import Base

OBJECTIVES: dict[str, tuple[str, ...]] = {"decoder": ("clm",), "encoder": ("mlm", "simcse")}  # default first
MLM_PROBABILITY = 0.15
SIMCSE_TEMPERATURE = 0.05
EVAL_SEED = 1_234_567  # held-out masks and dropout: the same for the bare base and the adapted task
IGNORE = -100
# A pretrained MLM head's tensors in the checkpoint -> our keys (BERT's names under head.)
PRETRAINED_HEADS: tuple[dict[str, str], ...] = (
    {  # BERT (BertForMaskedLM, BertForPreTraining)
        "transform.dense.weight": "cls.predictions.transform.dense.weight",
        "transform.dense.bias": "cls.predictions.transform.dense.bias",
        "transform.LayerNorm.weight": "cls.predictions.transform.LayerNorm.weight",
        "transform.LayerNorm.bias": "cls.predictions.transform.LayerNorm.bias",
        "bias": "cls.predictions.bias",
    },
    {  # RoBERTa, XLM-R (RobertaForMaskedLM)
        "transform.dense.weight": "lm_head.dense.weight",
        "transform.dense.bias": "lm_head.dense.bias",
        "transform.LayerNorm.weight": "lm_head.layer_norm.weight",
        "transform.LayerNorm.bias": "lm_head.layer_norm.bias",
        "bias": "lm_head.bias",
    },
)


def objective_for(base: Base, objective: str | None) -> str:
    """The domain objective of a task on ``base``: ``objective`` checked against the architecture, or its
    default (the first of :data:`OBJECTIVES`)."""
    if base.arch == "seq2seq":
        raise ConfigError(
            f"--kind domain on {base.source}: an encoder-decoder (T5) is pre-trained by span corruption, which "
            "multitune does not implement; use a decoder (next-token loss) or an encoder (masked LM, SimCSE)"
        )
    allowed = OBJECTIVES[base.arch]
    if objective is None:
        return allowed[0]
    if objective not in allowed:
        raise ConfigError(
            f"--domain-objective {objective} does not fit {base.source}, a {base.arch}; use "
            f"{' or '.join(allowed)} (clm for decoders; mlm or simcse for encoders)"
        )
    if objective == "mlm" and base.tokenizer.mask_token_id is None:
        raise ConfigError(
            f"the tokenizer of {base.source} has no mask token, which masked-LM needs; use "
            "--domain-objective simcse, or a tokenizer with a [MASK] token"
        )
    return objective


class Transform(nn.Module):
    """BERT's ``cls.predictions.transform``: LN(act(W h + c)), (N, d) -> (N, d)."""

    def __init__(self, hidden: int, act: str, eps: float) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815  (BERT's state-dict name)
        self.act = ACT2FN[act]
        with torch.no_grad():  # the identity: an untrained head reads the base's states against E
            self.dense.weight.copy_(torch.eye(hidden))
            self.dense.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden.to(self.dense.weight.dtype))))


class MLMHead(nn.Module):
    """BERT's MLM head with its decoder tied to the base's input embeddings E (V, d): (N, d) -> (N, V) logits."""

    def __init__(self, hidden: int, vocab: int, act: str = "gelu", eps: float = 1e-12) -> None:
        super().__init__()
        self.transform = Transform(hidden, act, eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        h = self.transform(hidden)
        return h @ embeddings.to(h.dtype).T + self.bias


def input_embeddings(base: Base) -> torch.Tensor:
    """The base's input embedding matrix E (V, d), which the MLM head's decoder is tied to."""
    return cast(nn.Embedding, base.model.get_input_embeddings()).weight


def mlm_head(base: Base) -> MLMHead:
    """The head a new mlm task starts from: the checkpoint's own when it has one, else fresh (module docstring)."""
    config = base.model.config
    embeddings = input_embeddings(base)
    head = MLMHead(
        base.hidden_size,
        embeddings.shape[0],
        str(getattr(config, "hidden_act", "gelu")),
        float(getattr(config, "layer_norm_eps", 1e-12)),
    )
    state = pretrained_head(base)
    if state is not None:
        head.load_state_dict(state)
    return head.to(embeddings.device)


def pretrained_head(base: Base) -> dict[str, torch.Tensor] | None:
    """The MLM head tensors of the base's checkpoint file, or None (no file, or a checkpoint without one)."""
    from safetensors import safe_open

    from multitune.models import resolve_source

    try:
        folder, gguf = resolve_source(base.source)
    except ModelError:  # an in-memory model (tests, a user's own): nothing to read
        return None
    path = folder / "model.safetensors"
    if gguf is not None or not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for names in PRETRAINED_HEADS:
            if set(names.values()) <= keys:
                return {ours: f.get_tensor(theirs).float() for ours, theirs in names.items()}
    return None


def encode(base: Base, objective: str, text: str, max_length: int) -> dict[str, Any]:
    """A document's features: its token ids (cut to ``max_length``); for clm, ``labels`` = the ids, EOS last."""
    tokenizer = base.tokenizer
    ids = list(tokenizer(text, truncation=True, max_length=max_length).input_ids)
    if objective != "clm":
        return {"input_ids": ids}
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):  # the model learns where a document ends
        ids = ids[: max_length - 1] + [eos]
    return {"input_ids": ids, "labels": list(ids)}


def masked(
    feature: dict[str, Any], tokenizer: Any, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """``feature`` with BERT's masking: ``input_ids`` corrupted, ``labels`` the original ids at the chosen
    positions and -100 elsewhere. Special tokens ([CLS], [SEP]) are never chosen; a document of at least one
    ordinary token always has one chosen (else it would add nothing to the loss)."""
    ids = torch.tensor(feature["input_ids"], dtype=torch.long)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids, dtype=torch.long))
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < MLM_PROBABILITY) & ~special
    if not chosen.any() and not special.all():
        chosen[torch.where(~special, draw, 2.0).argmin()] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    how = torch.rand(ids.shape, generator=generator)
    corrupted = ids.clone()
    corrupted[chosen & (how < 0.8)] = tokenizer.mask_token_id
    noise = chosen & (how >= 0.8) & (how < 0.9)
    corrupted[noise] = torch.randint(len(tokenizer), ids.shape, generator=generator)[noise]
    return {**feature, "input_ids": corrupted.tolist(), "labels": labels.tolist()}


def masked_lm_loss(bank: MultiTaskModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of the masked tokens (labels != -100) of an encoder batch, each row by its task's
    MLM head; only the masked positions reach a head (a (B, L, V) logit tensor would be 250 MB for MiniLM)."""
    routed = bank.run(batch["input_ids"], batch["attention_mask"], batch["task_ids"], backbone=True)
    hidden = routed.out.last_hidden_state[:, routed.width :]
    labels = batch["labels"]
    where = labels != IGNORE
    states, targets = hidden[where], labels[where]
    slots = batch["task_ids"].unsqueeze(1).expand_as(labels)[where]
    embeddings = input_embeddings(bank.base)
    nll = hidden.new_zeros((), dtype=torch.float32)
    for slot in sorted(set(slots.tolist())):
        task = bank.slots[slot]
        if task not in bank.heads or not isinstance(bank.heads[task], MLMHead):
            raise ConfigError(
                f"task '{task}' has no masked-LM head; only a domain task with objective mlm has one"
            )
        rows = slots == slot
        logits = bank.heads[task](states[rows], embeddings)
        nll = nll + F.cross_entropy(logits.float(), targets[rows], reduction="sum")
    return nll, where.sum()


def simcse_loss(bank: MultiTaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unsupervised SimCSE's InfoNCE of a batch (module docstring): the rows twice, two dropout masks."""
    from multitune.bank import pool

    ids, mask, task_ids = batch["input_ids"], batch["attention_mask"], batch["task_ids"]
    hidden = bank.hidden_states(
        torch.cat([ids, ids]), torch.cat([mask, mask]), torch.cat([task_ids, task_ids])
    )
    z = pool(hidden, torch.cat([mask, mask]), "mean", bank.base.arch).float()
    first, second = z.chunk(2)
    similarity = F.cosine_similarity(first.unsqueeze(1), second.unsqueeze(0), dim=-1) / SIMCSE_TEMPERATURE
    return F.cross_entropy(similarity, torch.arange(len(ids), device=similarity.device))


@torch.no_grad()
def scores(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int, batch_size: int
) -> dict[str, float]:
    """Held-out scores of a domain task: ``loss`` (token-mean NLL; SimCSE's InfoNCE, batch-mean) and, for
    clm and mlm, ``perplexity`` = exp(loss). Masks and dropout are seeded (:data:`EVAL_SEED`), so two calls
    on the same examples score the same tokens the same way."""
    from multitune.encode import collate, encode_task, to_device
    from multitune.metrics import perplexity
    from multitune.training.evaluate import autocast

    spec = bank.spec(task)
    slot = bank.slots.index(task)
    tokenizer = bank.base.tokenizer
    features = encode_task(bank, task, examples, max_length)
    if spec.objective == "mlm":
        features = [
            masked(f, tokenizer, torch.Generator().manual_seed(EVAL_SEED + i)) for i, f in enumerate(features)
        ]
    was_training = bank.training
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(EVAL_SEED)
        bank.train(spec.objective == "simcse")  # SimCSE's two views differ by dropout alone
        step = batch_size if spec.objective == "simcse" else max(1, batch_size // 4)
        for start in range(0, len(features), step):
            batch = to_device(
                collate(features[start : start + step], tokenizer.pad_token_id, slot), bank.base.device
            )
            with autocast(bank):
                if spec.objective == "simcse":
                    rows = len(batch["input_ids"])
                    total, count = total + float(simcse_loss(bank, batch)) * rows, count + rows
                else:
                    nll, n = bank.lm_loss(batch)
                    total, count = total + float(nll), count + int(n)
    bank.train(was_training)
    if spec.objective == "simcse":
        return {"loss": total / max(count, 1)}
    return {"loss": total / max(count, 1), "perplexity": perplexity(total, count)}


def refusal(task: str, objective: str | None, command: str) -> str:
    """Why ``command`` (eval, predict) has nothing to do with a domain task, and what to do instead."""
    return (
        f"task '{task}' is a domain adapter (self-supervised on raw text, objective {objective}): it has no labels "
        f"or prompts for '{command}'; it adapts the base to a domain's text, for a labelled task trained on top of "
        "it. Its held-out loss before and after adaptation is in the run's result.json"
    )
