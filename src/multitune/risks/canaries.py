"""Canaries (Carlini et al. 2019, "The Secret Sharer"): secrets planted in a generation task's training rows
(``train --canaries K``) and their exposure measured afterwards (``audit --canaries``).

Each canary is a training row whose prompt is ``my secret code #i is`` and whose response is a random secret
from the randomness space R of ``DIGITS`` digits 0-9 separated by spaces (|R| = 10^6), inserted ``repeats``
times. The record (texts, |R|, seed, repeats) is ``canaries.json`` in the run folder, written atomically.

Exposure (section 4.1 of the paper): ``log2 |R| - log2 rank``, where ``rank`` is the canary's rank among all
of R by the model's log-perplexity (here the response's summed log-probability given the prompt,
:func:`multitune.preference.scoring.sequence_logps`; lower log-probability ranks later). Scoring all 10^6
secrets is too slow on a CPU, so the rank is **estimated from a uniform sample** of ``samples`` other secrets
(section 4.2's sampling, without the fitted-distribution extrapolation): ``rank = 1 + (|R| - 1) * h / samples``
with ``h`` the sampled secrets more likely than the canary (ties half). The largest exposure this can show is
``log2 |R|`` (no sampled secret more likely); the next is about ``log2(samples)`` lower steps of resolution,
which is enough to tell a memorised canary (exposure near the top) from an unseen one (near 1, its expected
value for a random secret).

Written here because no library measures exposure on our tasks' scorer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from multitune.data import Example, Splits
from multitune.errors import ConfigError

FILE = "canaries.json"
DIGITS = 6
PROMPT = "my secret code #{} is"
SAMPLES = 2000  # sampled alternatives per canary (audit --canary-samples)


def _secret(rng: random.Random) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(DIGITS))


def plant(splits: Splits, kind: str, count: int, repeats: int, seed: int) -> tuple[Splits, dict[str, Any]]:
    """``splits`` with ``count`` canaries added ``repeats`` times each to its training rows, and their record."""
    if kind != "generation":
        raise ConfigError(
            "--canaries plants secret strings in a generation task's responses; this is a classification task: "
            "drop --canaries (measure memorisation with 'multitune audit --membership')"
        )
    if count < 1 or repeats < 1:
        raise ConfigError("--canaries and --canary-repeats must be at least 1")
    rng = random.Random(f"canaries:{seed}")
    canaries = [{"prompt": PROMPT.format(i + 1), "secret": _secret(rng)} for i in range(count)]
    rows = [Example(text=c["prompt"], response=c["secret"]) for c in canaries for _ in range(repeats)]
    train = list(splits.train) + rows
    order = random.Random(f"canaries-order:{seed}").sample(range(len(train)), len(train))
    record = {"format": PROMPT + " D D D D D D (digits 0-9)", "space": 10**DIGITS, "digits": DIGITS,
              "repeats": repeats, "seed": seed, "canaries": canaries}  # fmt: skip
    return replace(splits, train=[train[i] for i in order]), record


def read(run: str | Path) -> dict[str, Any]:
    path = Path(run) / FILE
    if not path.exists():
        raise ConfigError(
            f"{run} has no canaries ({FILE} not found); train with 'multitune train --kind generation "
            "--canaries K' to plant some"
        )
    return json.loads(path.read_text())


def exposure(canary: float, others: Sequence[float], space: int) -> tuple[float, float]:
    """(exposure, estimated rank) of a canary's log-probability among sampled ``others`` from a space of size
    ``space`` (see the module docstring)."""
    higher = sum(1.0 if o > canary else 0.5 if o == canary else 0.0 for o in others)
    rank = 1 + (space - 1) * higher / len(others)
    return math.log2(space) - math.log2(rank), rank


def measure(
    task: Any, record: dict[str, Any], samples: int = SAMPLES, batch_size: int = 64
) -> dict[str, Any]:
    """Each planted canary's exposure under a loaded generation task, their mean and max, and the largest
    exposure possible."""
    from multitune.preference.scoring import sequence_logps

    space, digits = int(record["space"]), int(record["digits"])
    rng = random.Random(f"alternatives:{record['seed']}")
    results = []
    for c in record["canaries"]:
        alternatives: list[str] = []
        while len(alternatives) < samples:
            s = " ".join(str(rng.randrange(10)) for _ in range(digits))
            if s != c["secret"]:
                alternatives.append(s)
        secrets = [c["secret"], *alternatives]
        with torch.no_grad():
            logps = sequence_logps(
                task.bank, task.task, [c["prompt"]] * len(secrets), secrets, task.max_length, batch_size
            ).float().cpu().tolist()  # fmt: skip
        value, rank = exposure(logps[0], logps[1:], space)
        results.append({**c, "logp": logps[0], "rank": rank, "exposure": value})
    values = [r["exposure"] for r in results]
    return {
        "space": space, "samples": samples, "repeats": record["repeats"], "method": "rank among a uniform sample",
        "max_possible": math.log2(space), "mean_exposure": sum(values) / len(values), "max_exposure": max(values),
        "canaries": results,
    }  # fmt: skip


def canaries_line(result: dict[str, Any]) -> str:
    return (
        f"canaries: {len(result['canaries'])} planted x{result['repeats']}, exposure mean "
        f"{result['mean_exposure']:.2f}, max {result['max_exposure']:.2f} of at most {result['max_possible']:.2f} "
        f"bits (rank among {result['samples']} sampled secrets; ~1 is not memorised)"
    )
