"""How prompting scores labels and finds similar shots, apart from the method itself.

Verbalisers: the summed log-probability of each label's continuation after each prompt. A causal LM reads
every prompt once and each multi-token continuation from the prompts' KV cache repeated per label; an
encoder-decoder runs its encoder once and decodes each continuation. Labels are processed in chunks of at most
``MAX_ROWS`` (prompt, label) rows per forward. Embeddings: the mean of the frozen base's last hidden states
over real tokens (every adapter off), what similar-shot selection and the encoders' label prototypes compare.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel
    from multitune.data import Example

EMBED_MAX_LENGTH = 128  # tokens of an example when embedding it for similar shots and prototypes
MAX_ROWS = 256  # (prompt, label) rows in one forward of the verbalisers' continuation tokens


def _padded(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) token ids padded with 0 and their mask."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def decoder_label_scores(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, continuations: list[list[int]]
) -> torch.Tensor:
    """Summed log-probabilities (B, C) of each continuation after each prompt, for a causal LM.

    The prompts are left-aligned first (padding of either side moves to the front), so every prompt
    ends at the last column and one logit row per prompt is computed. Continuation tokens after the
    first read the prompts' KV cache repeated per label: rows b*c + j of the repeated cache are prompt b
    with label j of the chunk, at positions len_b, len_b + 1, ...
    """
    order = torch.argsort(attention_mask, dim=1, stable=True)  # pads first, the text in its order after
    ids, mask = input_ids.gather(1, order), attention_mask.gather(1, order)
    batch, device = ids.shape[0], ids.device
    longer = [c for c, seq in enumerate(continuations) if len(seq) > 1]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=bool(longer),
        logits_to_keep=1,
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    scores = first[:, torch.tensor([seq[0] for seq in continuations], device=device)]  # (B, C)
    if not longer:
        return scores
    lengths = mask.sum(1)
    chunks = _chunks(longer, max(1, MAX_ROWS // batch))
    for n, labels in enumerate(chunks):
        cache = out.cache if n == len(chunks) - 1 else copy.deepcopy(out.cache)
        c = len(labels)
        cache.batch_repeat_interleave(c)
        tokens, tmask = _padded([continuations[j] for j in labels], device)  # (c, T)
        steps = tokens.shape[1] - 1
        logits = model(
            input_ids=tokens[:, :-1].repeat(batch, 1),
            attention_mask=torch.cat([mask.repeat_interleave(c, 0), tmask[:, :-1].repeat(batch, 1)], 1),
            position_ids=lengths.repeat_interleave(c)[:, None] + torch.arange(steps, device=device),
            cache=cache,
            use_cache=True,
        ).logits  # (B*c, T-1, V)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, tokens[:, 1:].repeat(batch, 1)[..., None]
        )[..., 0]
        scores[:, labels] += (logp * tmask[:, 1:].repeat(batch, 1)).sum(-1).view(batch, c)
    return scores


def seq2seq_label_scores(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, continuations: list[list[int]]
) -> torch.Tensor:
    """Summed log-probabilities (B, C) of each continuation as the decoder's output, for an encoder-decoder.

    The encoder runs once; its output is repeated per label (rows b*c + j) for the decoder, which reads
    ``[start, v_1, ..., v_{T-1}]`` and predicts ``v_1..v_T``.
    """
    from transformers.modeling_outputs import BaseModelOutput

    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    batch, device = input_ids.shape[0], input_ids.device
    start = model.config.decoder_start_token_id or 0

    def decode(c: int, decoder_ids: torch.Tensor) -> torch.Tensor:  # (B*c, T, V) log-probabilities
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(c, 0)),
            attention_mask=attention_mask.repeat_interleave(c, 0),
            decoder_input_ids=decoder_ids,
            use_cache=False,
        ).logits
        return torch.log_softmax(logits.float(), dim=-1)

    if all(len(seq) == 1 for seq in continuations):  # one decoder step, [start], serves every label
        first = decode(1, torch.full((batch, 1), start, dtype=torch.long, device=device))[:, 0]
        return first[:, torch.tensor([seq[0] for seq in continuations], device=device)]
    scores = torch.zeros(batch, len(continuations), device=device)
    for labels in _chunks(list(range(len(continuations))), max(1, MAX_ROWS // batch)):
        c = len(labels)
        tokens, tmask = _padded([continuations[j] for j in labels], device)  # (c, T)
        starts = torch.full((c, 1), start, dtype=torch.long, device=device)
        logp = decode(c, torch.cat([starts, tokens[:, :-1]], 1).repeat(batch, 1))
        picked = logp.gather(-1, tokens.repeat(batch, 1)[..., None])[..., 0]
        scores[:, labels] = (picked * tmask.repeat(batch, 1)).sum(-1).view(batch, c)
    return scores


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def example_ids(bank: MultiTaskModel, example: Example, max_length: int) -> list[int]:
    """An example's token ids, as :func:`multitune.encode.encode_example` makes them for classification."""
    tokenizer = bank.base.tokenizer
    if example.text_pair is not None and bank.base.arch == "decoder":
        return list(
            tokenizer(
                example.text + "\n" + example.text_pair, truncation=True, max_length=max_length
            ).input_ids
        )
    return list(tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length).input_ids)


def mean_hidden(bank: MultiTaskModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the base model's last hidden states (B, d), every adapter off (T5: encoder)."""
    model = bank.base.model
    body = model.get_encoder() if bank.base.arch == "seq2seq" else bank.base.backbone()
    with torch.no_grad(), bank.disabled():
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def embed_ids(bank: MultiTaskModel, rows: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    from multitune.encode import collate

    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate(
            [{"input_ids": r} for r in rows[start : start + batch_size]], bank.base.tokenizer.pad_token_id, 0
        )
        device = bank.base.device
        out.append(mean_hidden(bank, batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return torch.cat(out) if out else torch.empty(0, bank.base.hidden_size, device=bank.base.device)


def embed(bank: MultiTaskModel, examples: Sequence[Example]) -> torch.Tensor:
    """(N, d) embeddings of examples' inputs, for similar shots."""
    return embed_ids(bank, [example_ids(bank, ex, EMBED_MAX_LENGTH) for ex in examples])


def select_shots(
    k: int, excluded: torch.Tensor, seeds: list[str], sims: torch.Tensor | None
) -> list[list[int]]:
    """k pool indices per row: a seeded sample, or the k most similar (ascending, so the nearest is last)."""
    if sims is None:
        out = []
        for row, seed in zip(excluded.tolist(), seeds, strict=True):
            candidates = [i for i, out_ in enumerate(row) if not out_]
            out.append(random.Random(seed).sample(candidates, min(k, len(candidates))))
        return out
    sims = sims.float().masked_fill(excluded.to(sims.device), float("-inf"))
    top = sims.topk(min(k, sims.shape[1]), dim=1)
    return [
        [i for i, v in zip(idx, val, strict=True) if v != float("-inf")][::-1]
        for idx, val in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]
