"""A task's reference profile: what its traffic looked like when it was trained, for drift tests later.

Built once from labelled examples (the validation split; the training split when a run has none) and saved in
the adapter folder beside the weights (``profile.safetensors`` + ``profile.json``, never a pickle)::

    features        (n, k)  the pooled hidden state the head reads, projected to k <= 32 dimensions by a PCA
                            (mean (H,), components (H, k) stored with it), for a sample of n <= 500 rows (at
                            most half the rows): what MMD compares a live window with. The PCA is fitted on
                            the other rows: fitted on the sample itself, its top directions are those in
                            which that sample happens to vary most, so new rows of the same distribution vary
                            less along them and MMD tells them apart (SST-2, MiniLM: of 150 windows of 200
                            unshifted test rows, 40% had p < 0.05 against a sample inside the fit, 3% apart)
    lengths         (n,)    input tokens per row (special tokens included, after truncation, as served)
    unknown_rates   (n,)    share of a row's tokens that are the tokenizer's unknown token
    label_counts    (C,)    predicted labels over every reference row (classification)
    confidences     (n,)    max probability per row, uncalibrated (what the server sees)
    temperature             T minimising the validation NLL of softmax(logits / T) (Guo et al. 2017,
                            section 4.2): the calibration map of the label-free accuracy estimate
    response_lengths (n,)   target response tokens (generation)
    mean_logprobs   (n,)    teacher-forced mean token log-probability of the target response (generation)

The projection's components are rounded to float16 before the reference is projected, so the stored
reference and a live row projected at serving time go through the same numbers; at H = 4096 they take
256 kB, the reference sample 64 kB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from multitune.bank import MultiTaskModel
from multitune.data import Example
from multitune.encode import IGNORE, collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.health.stats import median_sigma
from multitune.storage import write_bytes_atomic

PROFILE_TENSORS = "profile.safetensors"
PROFILE_JSON = "profile.json"
PROFILE_FILES = (PROFILE_TENSORS, PROFILE_JSON)
FORMAT = "multitune-profile"
VERSION = 1
DIMENSIONS = 32
SAMPLE = 500
FIT_ROWS = 4000  # rows the PCA is fitted on at most: more changes nothing a drift test can see
PROFILE_HINT = "run `multitune profile RUN --data FILE` to build one"


@dataclass
class Profile:
    """A task's reference statistics (see the module docstring for each field's meaning and shape)."""

    task: str
    kind: str
    labels: list[str]
    mean: torch.Tensor  # (H,)
    components: torch.Tensor  # (H, k)
    features: torch.Tensor  # (n, k)
    lengths: torch.Tensor  # (n,)
    unknown_rates: torch.Tensor  # (n,)
    label_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (C,)
    confidences: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (n,)
    temperature: float = 1.0
    sigma: float = 1.0  # the RBF width of MMD: the median heuristic on the reference features
    response_lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (n,)
    mean_logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (n,)
    rows: int = 0  # reference rows the profile was built from (before sampling)
    accuracy: float | None = None  # on the reference rows, when they were labelled
    estimated_accuracy: float | None = None  # mean calibrated confidence on the same rows

    @property
    def label_distribution(self) -> torch.Tensor:
        """Predicted-label shares (C,) on the reference rows."""
        total = self.label_counts.sum()
        return self.label_counts / total if float(total) > 0 else self.label_counts

    @property
    def has_features(self) -> bool:
        return self.features.numel() > 0

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled hidden states (B, H) -> reference coordinates (B, k), in float32 on the CPU."""
        pooled = pooled.detach().to("cpu", torch.float32)
        return (pooled - self.mean) @ self.components.float()

    def calibrated(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled probabilities (B, C): softmax(log p / T) equals softmax(logits / T)."""
        return torch.softmax(probabilities.float().clamp(min=1e-12).log() / self.temperature, dim=-1)


# ---- what a forward gives per row ------------------------------------------------------------------------
def token_stats(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, unk_id: int | None
) -> tuple[list[int], list[float]]:
    """(tokens per row, share of a row's tokens that are the unknown token) of a padded batch (B, L).

    The server and the profile both count this way, so their length and unknown-rate tests compare alike.
    """
    lengths = attention_mask.sum(1)
    if unk_id is None:
        return [int(n) for n in lengths.tolist()], [0.0] * int(input_ids.shape[0])
    unknown = ((input_ids == unk_id) & attention_mask.bool()).sum(1)
    rates = (unknown.double() / lengths.clamp(min=1)).tolist()
    return [int(n) for n in lengths.tolist()], [float(r) for r in rates]


@dataclass
class Observed:
    """Per-row quantities of examples run through a task (what the server's forward yields per row)."""

    pooled: torch.Tensor | None  # (N, H) float32, None without a head
    logits: torch.Tensor | None  # (N, C) classification
    gold: list[int | None]  # label index, None when unlabelled or outside the label set
    lengths: list[int]
    unknown_rates: list[float]
    response_lengths: list[int]
    mean_logprobs: list[float]

    @property
    def probabilities(self) -> torch.Tensor | None:
        return None if self.logits is None else torch.softmax(self.logits, dim=-1)


@torch.no_grad()
def observe_examples(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int, batch_size: int = 64
) -> Observed:
    """Run ``examples`` through ``task`` in batches: pooled features, logits, lengths, unknown rates, and for
    generation examples with a response, its token count and teacher-forced mean token log-probability."""
    from multitune.training.evaluate import autocast

    spec = bank.spec(task)
    slot = bank.slots.index(task)
    tokenizer = bank.base.tokenizer
    was_training = bank.training
    bank.eval()
    pooled: list[torch.Tensor | None] = []
    logits: list[torch.Tensor] = []
    out = Observed(None, None, [], [], [], [], [])
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if spec.kind == "classification":
            features = encode_task(bank, task, chunk, max_length)
            batch = to_device(collate(features, tokenizer.pad_token_id, slot), bank.base.device)
            with autocast(bank):
                scores = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"], pooled)
            logits.append(scores[:, : len(spec.labels)].float().cpu())
            out.gold += [f.get("class_label") for f in features]
            ids, mask = batch["input_ids"], batch["attention_mask"]
        else:
            prompts = encode_task(bank, task, chunk, max_length, with_target=False)
            padded = collate(prompts, tokenizer.pad_token_id, slot)
            ids, mask = padded["input_ids"], padded["attention_mask"]
            with_response = [ex for ex in chunk if ex.response is not None]
            if with_response:
                n, lp = _response_logprobs(bank, task, with_response, max_length)
                out.response_lengths += n
                out.mean_logprobs += lp
        lengths, rates = token_stats(ids.cpu(), mask.cpu(), tokenizer.unk_token_id)
        out.lengths += lengths
        out.unknown_rates += rates
    bank.train(was_training)
    if logits:
        out.logits = torch.cat(logits)
    if pooled and all(p is not None for p in pooled):
        out.pooled = torch.cat([p.cpu() for p in pooled if p is not None])
    return out


def _response_logprobs(
    bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int
) -> tuple[list[int], list[float]]:
    """(response tokens, mean log-probability of each response token given what precedes it) per example."""
    from multitune.training.evaluate import autocast

    slot = bank.slots.index(task)
    features = encode_task(bank, task, examples, max_length)
    batch = to_device(collate(features, bank.base.tokenizer.pad_token_id, slot), bank.base.device)
    with autocast(bank):
        logits, labels = bank.target_logits(batch)
    mask = labels != IGNORE
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    counts = mask.sum(1)
    means = (logp * mask).sum(1) / counts.clamp(min=1)
    return [int(c) for c in counts.tolist()], [float(m) for m in means.tolist()]


# ---- building ----------------------------------------------------------------------------------------------
def fit_temperature(logits: torch.Tensor, gold: torch.Tensor) -> float:
    """The temperature T > 0 minimising the mean NLL of softmax(logits / T) on labelled rows (1 without rows).

    The NLL is convex in 1/T, so a bounded search over log T finds the one minimum; T is kept in [0.05, 20].
    """
    if gold.numel() == 0:
        return 1.0
    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / torch.tensor(log_t).exp(), gold))

    lo, hi = torch.log(torch.tensor(0.05)).item(), torch.log(torch.tensor(20.0)).item()
    ratio = (5**0.5 - 1) / 2  # golden-section search
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(torch.tensor((lo + hi) / 2).exp())


def pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (H,), components (H, k)) of rows x (N, H): the top-k right singular vectors of the centred rows,
    each signed so that its largest entry is positive (a refit on the same rows gives the same projection)."""
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    components = vh[:k].T  # (H, k)
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1.0
    return mean, components * signs


def build_profile(
    bank: MultiTaskModel,
    task: str,
    examples: Sequence[Example],
    max_length: int = 128,
    *,
    batch_size: int = 64,
    dimensions: int = DIMENSIONS,
    sample: int = SAMPLE,
    seed: int = 0,
) -> Profile:
    """The reference profile of ``task`` from ``examples`` (validation rows, labelled for the calibration)."""
    if not examples:
        raise ConfigError(f"no examples to build the profile of task '{task}' from; give a non-empty --data")
    spec = bank.spec(task)
    seen = observe_examples(bank, task, examples, max_length, batch_size)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator)
    n_ref = min(sample, len(examples) // 2) if len(examples) >= 4 else len(examples)
    keep, fit = order[:n_ref].sort().values, order[n_ref : n_ref + FIT_ROWS]
    hidden = bank.base.hidden_size
    mean, components, features, sigma = torch.zeros(hidden), torch.zeros(hidden, 0), torch.zeros(0, 0), 1.0
    if seen.pooled is not None and len(examples) >= 2:
        fit_rows = seen.pooled[fit if fit.numel() >= 2 else keep].double()  # apart from the sample (above)
        k = max(1, min(dimensions, fit_rows.shape[0] - 1, hidden))
        mean64, components64 = pca(fit_rows, k)
        mean, components = mean64.float(), components64.half()
        profile_features = (seen.pooled[keep] - mean) @ components.float()
        features, sigma = profile_features, median_sigma(profile_features, profile_features)
    profile = Profile(
        task=task,
        kind=spec.kind,
        labels=list(spec.labels),
        mean=mean,
        components=components,
        features=features,
        lengths=torch.tensor(seen.lengths, dtype=torch.float32)[keep],
        unknown_rates=torch.tensor(seen.unknown_rates, dtype=torch.float32)[keep],
        sigma=sigma,
        rows=len(examples),
    )
    if seen.logits is not None:
        probs = torch.softmax(seen.logits, dim=-1)
        profile.label_counts = torch.bincount(probs.argmax(1), minlength=len(spec.labels)).float()
        profile.confidences = probs.max(1).values[keep]
        labelled = [i for i, g in enumerate(seen.gold) if g is not None]
        gold = torch.tensor([seen.gold[i] for i in labelled], dtype=torch.long)
        profile.temperature = fit_temperature(seen.logits[labelled], gold)
        if labelled:
            profile.accuracy = float((probs[labelled].argmax(1) == gold).double().mean())
        profile.estimated_accuracy = float(profile.calibrated(probs).max(1).values.double().mean())
    if seen.response_lengths:
        picked = torch.randperm(len(seen.response_lengths), generator=generator)[:sample]
        profile.response_lengths = torch.tensor(seen.response_lengths, dtype=torch.float32)[picked]
        profile.mean_logprobs = torch.tensor(seen.mean_logprobs, dtype=torch.float32)[picked]
    return profile


REFERENCE_ROWS = 2000  # examples a profile is built from at most: its cost stays a small share of training


def save_task_profile(
    bank: MultiTaskModel,
    task: str,
    adapter_dir: str | Path,
    validation: Sequence[Example],
    train: Sequence[Example],
    max_length: int,
    batch_size: int = 64,
) -> Profile | None:
    """Build and save the profile of a task that has just been trained: on its validation split (the rows
    the calibration must not have seen being trained on), else on its training split; at most
    REFERENCE_ROWS of them, a seeded sample. None (nothing written) when there is no data at all, or for a
    domain task (multitune.domain), which answers no requests to watch."""
    examples = list(validation) or list(train)
    if not examples or bank.spec(task).kind == "domain":
        return None
    if len(examples) > REFERENCE_ROWS:
        keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:REFERENCE_ROWS]
        examples = [examples[i] for i in sorted(keep.tolist())]
    profile = build_profile(bank, task, examples, max_length, batch_size=batch_size)
    save_profile(profile, adapter_dir)
    return profile


# ---- saving and loading -----------------------------------------------------------------------------------
_TENSORS = (
    "mean",
    "components",
    "features",
    "lengths",
    "unknown_rates",
    "label_counts",
    "confidences",
    "response_lengths",
    "mean_logprobs",
)
_SCALARS = ("task", "kind", "labels", "temperature", "sigma", "rows", "accuracy", "estimated_accuracy")


def save_profile(profile: Profile, adapter_dir: str | Path) -> None:
    """Write the profile into an adapter folder: the tensors, then the JSON that names their checksum.

    Each file is replaced atomically; the JSON goes last and records the tensors' SHA-256, so a reader sees
    either the old profile or the new one (a kill between the two renames leaves a mismatch that
    :func:`load_profile` reports, never a mix).
    """
    folder = Path(adapter_dir)
    data = save_tensors({name: getattr(profile, name).contiguous() for name in _TENSORS})
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest()}
    meta.update({name: getattr(profile, name) for name in _SCALARS})
    write_bytes_atomic(folder / PROFILE_TENSORS, data)
    write_bytes_atomic(folder / PROFILE_JSON, json.dumps(meta, indent=2).encode())


def load_profile(adapter_dir: str | Path) -> Profile | None:
    """The profile saved in ``adapter_dir``, or None when it has none; a damaged one is a ConfigError."""
    folder = Path(adapter_dir)
    path = folder / PROFILE_JSON
    if not path.is_file():
        return None
    damaged = f"the drift profile in {folder} is damaged"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        data = (folder / PROFILE_TENSORS).read_bytes()
    except (OSError, ValueError) as error:
        raise ConfigError(f"{damaged} ({type(error).__name__}); {PROFILE_HINT}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{damaged} (not a {FORMAT} document); {PROFILE_HINT}")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ConfigError(
            f"the drift profile in {folder} is of a newer multitune; upgrade, or {PROFILE_HINT}"
        )
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        raise ConfigError(f"{damaged} (its tensors do not match its checksum); {PROFILE_HINT}")
    wrong = [
        key
        for key, ok in (
            ("task", isinstance(meta.get("task"), str)),
            ("kind", meta.get("kind") in ("classification", "generation")),
            (
                "labels",
                isinstance(meta.get("labels"), list) and all(isinstance(x, str) for x in meta["labels"]),
            ),
            ("temperature", isinstance(meta.get("temperature"), int | float) and meta["temperature"] > 0),
            ("sigma", isinstance(meta.get("sigma"), int | float) and meta["sigma"] > 0),
        )
        if not ok
    ]
    if wrong:
        raise ConfigError(
            f"{damaged} (field {', '.join(wrong)} missing or of the wrong type); {PROFILE_HINT}"
        )
    try:
        tensors = load_tensors(data)
        fields: dict[str, Any] = {name: meta[name] for name in _SCALARS}
        fields.update({name: tensors[name] for name in _TENSORS})
        return Profile(**fields)
    except (SafetensorError, KeyError, TypeError) as error:
        raise ConfigError(f"{damaged} (missing {error}); {PROFILE_HINT}") from error
