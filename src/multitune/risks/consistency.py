"""A reference-free hallucination signal for generation tasks (``multitune audit --consistency``): SelfCheckGPT's
cheapest variants (Manakul et al. 2023, sections 5.1 and 5.3).

For each prompt, the greedy answer and ``samples`` answers sampled at ``temperature`` (1 by default, through the
same :func:`multitune.training.evaluate.generate_texts` that evaluation uses, seeded by ``torch.manual_seed``):

- **mean token log-probability** of the greedy answer (its summed log-probability by
  :func:`multitune.preference.scoring.sequence_logps`, which counts the EOS, over its tokens plus one): low
  means the model was unsure of what it said (the paper's "Avg(-log p)" proxy, negated);
- **self-consistency**: the mean unigram-overlap F1 (ROUGE-1 F1, lower-cased whitespace words) of the greedy
  answer against each sample. An answer the model knows is reproduced by its samples (near 1); one it makes
  up is not (the paper's n-gram variant with n = 1, as a similarity rather than a surprisal).

Written here because SelfCheckGPT's package pulls in models for its other variants; these two are a few lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from multitune.data import Example

WORST = 5


def unigram_f1(a: str, b: str) -> float:
    """ROUGE-1 F1 of two texts' lower-cased whitespace words (1.0 for two empty texts)."""
    x, y = Counter(a.lower().split()), Counter(b.lower().split())
    if not x and not y:
        return 1.0
    overlap = sum((x & y).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(x.values()), overlap / sum(y.values())
    return 2 * precision * recall / (precision + recall)


def self_consistency(greedy: str, samples: Sequence[str]) -> float:
    """Mean unigram F1 of the greedy answer against each sample."""
    return sum(unigram_f1(greedy, s) for s in samples) / len(samples)


def run_consistency(
    task: Any,
    examples: Sequence[Example],
    samples: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The ``consistency`` section of ``audit.json`` for a loaded generation task on ``examples``' prompts."""
    rows = consistency_rows(task, examples, samples, temperature, seed, max_new_tokens, batch_size)
    return {
        "rows": len(rows), "samples": samples, "temperature": temperature, "seed": seed,
        "mean_consistency": sum(r["consistency"] for r in rows) / len(rows),
        "mean_token_logp": sum(r["mean_token_logp"] for r in rows) / len(rows),
        "least_consistent": sorted(rows, key=lambda r: r["consistency"])[:WORST],
    }  # fmt: skip


def consistency_rows(
    task: Any,
    examples: Sequence[Example],
    samples: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Each prompt's greedy answer, its ``samples`` sampled answers, mean token log-probability and consistency."""
    from multitune.preference.scoring import sequence_logps
    from multitune.training.evaluate import generate_texts

    bank, name, length = task.bank, task.task, task.max_length
    greedy = generate_texts(bank, name, examples, length, max_new_tokens, batch_size)
    torch.manual_seed(seed)
    drawn = [
        generate_texts(
            bank,
            name,
            examples,
            length,
            max_new_tokens,
            batch_size,
            do_sample=True,
            temperature=temperature,
            top_k=0,
        )  # fmt: skip
        for _ in range(samples)
    ]
    with torch.no_grad():
        logps = sequence_logps(bank, name, [e.text for e in examples], greedy, length, batch_size)
    tokenizer = bank.base.tokenizer
    rows: list[dict[str, Any]] = []
    for i, example in enumerate(examples):
        tokens = len(tokenizer(greedy[i], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        answers = [d[i] for d in drawn]
        rows.append({"prompt": example.text, "greedy": greedy[i], "samples": answers,
                     "mean_token_logp": float(logps[i]) / tokens,
                     "consistency": self_consistency(greedy[i], answers)})  # fmt: skip
    return rows


def consistency_line(result: dict[str, Any]) -> str:
    return (
        f"consistency: {result['rows']} prompts, self-consistency (unigram F1 of the greedy answer against "
        f"{result['samples']} samples at temperature {result['temperature']:g}) {result['mean_consistency']:.3f}, "
        f"mean token log-probability {result['mean_token_logp']:.3f}"
    )
