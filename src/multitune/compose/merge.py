"""Merging task adapters: several LoRA (or (IA)^3) tasks over one base become one body, each task keeping its own
classification head.

A LoRA task t adds ``dW_t = s_t B_t A_t`` (out, in) to a layer (``s_t`` = alpha / r, or alpha / sqrt(r) with
rsLoRA); an (IA)^3 task scales a layer by ``l_t`` (its task vector is ``l_t - 1``). The merge methods, per layer,
with weights w_t (default 1 each: the task vectors are summed, Ilharco et al. 2023's task arithmetic at
lambda = 1):

- ``cat`` (LoRA): ``A = [w_1 s_1 A_1; ...; w_T s_T A_T]`` (sum r, in), ``B = [B_1 ... B_T]`` (out, sum r), scale 1,
  so ``B A = sum_t w_t dW_t`` exactly: nothing is lost, the rank is the sum of the ranks.
- ``linear`` (LoRA, PEFT's ``add_weighted_adapter(combination_type="linear")``): the factors are averaged,
  ``A = sum_t sign(w_t) sqrt(|w_t| s_t) A_t`` and ``B = sum_t sqrt(|w_t| s_t) B_t``, scale 1; every task needs one
  rank. ``B A`` has cross terms ``B_i A_j``: it is not ``sum_t w_t dW_t`` (cat is), which is why PEFT keeps it
  only for adapters trained from one initialisation. For (IA)^3: ``l = 1 + sum_t w_t (l_t - 1)``.
- ``svd`` (LoRA): ``sum_t w_t dW_t`` re-factorised by a truncated SVD to ``--rank`` (default the largest
  constituent rank, as PEFT): ``B = U_k S_k``, ``A = V_k^T``.
- ``ties`` (Yadav et al. 2023, "TIES-Merging", section 3): per task vector trim to the top ``density`` share of
  entries by magnitude; elect the sign of each entry by the total mass ``sign(sum_t w_t trimmed_t)``; the
  disjoint mean of the weighted entries that agree with it. LoRA: on the task vectors ``dW_t``, then the SVD
  above (PEFT's ``ties_svd``; PEFT's plain ``ties`` trims A and B separately, which is not the paper's task
  vector); (IA)^3: on ``l_t - 1``.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "Language Models are Super Mario", section 3.2): every entry
  of a task vector is dropped with probability ``1 - density`` and the kept ones are divided by ``density``
  (the expected task vector is unchanged); then the weighted sum, or TIES' sign election and disjoint mean.
  Seeded (``--seed``), one generator for the whole merge.

PEFT is the reference for what each name computes (tests/compose/test_merge.py checks ``cat``, ``linear`` and
``svd`` against its ``add_weighted_adapter`` and the TIES/DARE steps against ``peft.utils.merge_utils``); we
merge saved adapter files rather than a live model, so a merge needs no base model and tasks from separate runs
merge. A merged task is an ordinary LoRA (or (IA)^3) task: saved, loaded, served and exported as any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitune.errors import ConfigError

MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
MERGEABLE = ("lora", "ia3")
LORA_A, LORA_B, IA3 = ".lora_A.weight", ".lora_B.weight", ".ia3_l"
HEAD = "head."


@dataclass(frozen=True)
class MergeSettings:
    method: str = "ties"
    weights: tuple[float, ...] | None = None  # one per task; default 1 each (task vectors summed)
    density: float = 0.5  # ties / dare: the share of each task vector's entries kept
    rank: int | None = None  # svd / ties / dare on LoRA: the merged rank (default the largest constituent's)
    seed: int = 0  # dare's drops

    def check(self, tasks: int) -> None:
        problems = []
        if self.method not in MERGE_METHODS:
            problems.append(
                f"--method '{self.method}' is not a merge method; use one of {', '.join(MERGE_METHODS)}"
            )
        if self.weights is not None and len(self.weights) != tasks:
            problems.append(f"--weights has {len(self.weights)} values for {tasks} tasks; give one per task")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            problems.append("--weights must be finite numbers")
        if not (0.0 < self.density <= 1.0):
            problems.append(
                f"--density must be in (0, 1] (got {self.density}); 0.5 keeps half of each task vector"
            )
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        if problems:
            raise ConfigError("; ".join(problems))

    def task_weights(self, tasks: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * tasks


@dataclass
class Constituent:
    """One task to merge: its adapter document and tensors (read from its folder, never the model)."""

    name: str
    folder: Path  # its adapter folder
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return str(self.meta["task"]["method"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta["task"]["config"])

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if k.startswith(HEAD)}

    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer path -> (A (r, in), B (out, r)) of a LoRA task."""
        layers = sorted(k[: -len(LORA_A)] for k in self.state if k.endswith(LORA_A))
        return {n: (self.state[n + LORA_A].float(), self.state[n + LORA_B].float()) for n in layers}

    def scaling(self) -> float:
        config = self.config
        rank, alpha = int(config.get("rank", 8)), float(config.get("alpha", 16.0))
        return alpha / (math.sqrt(rank) if config.get("rslora") else rank)

    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.lora().values()), default=int(self.config.get("rank", 8)))


def read_constituents(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Constituent]:
    """The tasks of ``paths`` (run or adapter folders), checked as a group: two or more, distinct names."""
    from safetensors.torch import load_file

    from multitune.api import adapter_folder
    from multitune.storage import WEIGHTS_FILE, read_adapter_config

    if len(paths) < 2:
        raise ConfigError("merge needs two or more tasks (run or adapter folders)")
    if names is not None and len(names) != len(paths):
        raise ConfigError(f"--names has {len(names)} names for {len(paths)} tasks; give one per task")
    out = []
    for i, path in enumerate(paths):
        folder = adapter_folder(path)
        meta = read_adapter_config(folder)
        try:
            state = load_file(str(folder / WEIGHTS_FILE))
        except (OSError, ValueError) as error:  # safetensors' own error is a ValueError subclass
            raise ConfigError(
                f"cannot read {folder / WEIGHTS_FILE}: {' '.join(str(error).split())}"
            ) from error
        out.append(Constituent(names[i] if names else str(meta["task"]["name"]), folder, meta, state))
    seen: dict[str, Path] = {}
    for c in out:
        if c.name in seen:
            raise ConfigError(
                f"two tasks are named '{c.name}' ({seen[c.name]} and {c.folder}); name them with --names a,b,..."
            )
        seen[c.name] = c.folder
    return out


def check_mergeable(tasks: Sequence[Constituent], method: str) -> None:
    """Refuse, naming the tasks, what cannot merge: other bases, other methods, DoRA, ranks ``linear`` needs equal."""
    bases: dict[str, list[str]] = {}
    for c in tasks:
        bases.setdefault(repr(c.meta.get("base")), []).append(c.name)
    if len(bases) > 1:
        groups = "; ".join(", ".join(names) for names in bases.values())
        raise ConfigError(
            f"the tasks were trained on different base models ({groups}); only tasks of one base merge"
        )
    stacked = [f"{c.name} (on {c.meta['stack_on'].get('task')})" for c in tasks if "stack_on" in c.meta]
    if stacked:
        raise ConfigError(
            f"{', '.join(stacked)} run on top of another task (--stack-on), so their task vectors are not "
            "deltas of the base; merge tasks trained on the bare base"
        )
    methods = {c.method for c in tasks}
    wrong = [f"{c.name} ({c.method})" for c in tasks if c.method not in MERGEABLE]
    if wrong:
        raise ConfigError(
            f"{', '.join(wrong)} cannot merge: merging adds task vectors of LoRA or (IA)^3 tasks; "
            "serve such tasks beside the merged ones instead"
        )
    if len(methods) > 1:
        listed = ", ".join(f"{c.name} ({c.method})" for c in tasks)
        raise ConfigError(f"the tasks use different methods ({listed}); merge tasks of one method")
    if "ia3" in methods and method in ("cat", "svd"):
        raise ConfigError(
            f"--method {method} re-factorises low-rank updates; (IA)^3 vectors merge with linear, ties, "
            "dare_linear or dare_ties"
        )
    dora = [c.name for c in tasks if c.config.get("use_dora")]
    if dora:
        raise ConfigError(
            f"{', '.join(dora)} use DoRA, whose magnitudes are not task vectors that add; merge plain LoRA tasks"
        )
    if "lora" in methods and method == "linear":
        ranks = {c.name: c.rank() for c in tasks}
        if len(set(ranks.values())) > 1:
            shown = ", ".join(f"{n} r{r}" for n, r in ranks.items())
            raise ConfigError(
                f"--method linear averages the factors A and B, so every task needs one rank ({shown}); "
                "use --method cat (exact, rank = the sum) or --method svd (--rank R)"
            )
    others = [
        f"{c.name}: {k}" for c in tasks for k in c.state if not _merged_key(k) and not k.startswith(HEAD)
    ]
    if others:
        raise ConfigError(f"tensors that are neither task vectors nor heads: {', '.join(others[:5])}")


def _merged_key(key: str) -> bool:
    return key.endswith((LORA_A, LORA_B, IA3))


# ---- the merge of task vectors -------------------------------------------------------------------------------
def trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the top ``density`` share of entries by magnitude, the rest zero (PEFT's k = int(d * n))."""
    if density >= 1.0:
        return vector
    flat = vector.reshape(-1)
    k = int(density * flat.numel())
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(k).indices] = 1.0
    return (flat * mask).view_as(vector)


def drop(vector: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it."""
    if density >= 1.0:
        return vector
    keep = torch.rand(vector.shape, generator=generator) < density
    return vector * keep / density


def elect_and_mean(stacked: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean over the task axis 0 of ``stacked`` (T, ...), weights ``w``.

    The sign of an entry is that of its total mass over the (trimmed, unweighted) task vectors, as the paper
    elects it (its weights come after the merge, as one lambda) and PEFT does; the mean is of the weighted
    entries that agree with it."""
    sign = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    kept = (stacked * w * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1)


def merge_vectors(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``linear``/``svd`` (the weighted sum), ``ties``, ``dare_linear``, ``dare_ties`` of same-shape task vectors."""
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * vectors[0].dim()))
    if method == "ties":
        stacked = torch.stack([trim(v, density) for v in vectors])
    elif method.startswith("dare"):
        stacked = torch.stack([drop(v, density, generator) for v in vectors])
    else:
        stacked = torch.stack(list(vectors))
    if method in ("ties", "dare_ties"):
        return elect_and_mean(stacked, w)
    return (stacked * w).sum(dim=0)


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``delta`` (out, in) ~ B A with B (out, k) = U_k S_k and A (k, in) = V_k^T, k = min(rank, out, in), padded
    with zeros to ``rank``; and the share of ``||delta||_F^2`` kept."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    if k < rank:
        b = torch.nn.functional.pad(b, (0, rank - k))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - k))
    return a.contiguous(), b.contiguous(), kept


def merge_lora(
    tasks: Sequence[Constituent], settings: MergeSettings
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The merged body's tensors, its LoRA config (scale 1: alpha = rank) and what the merge kept."""
    weights = settings.task_weights(len(tasks))
    layers = [c.lora() for c in tasks]
    scales = [c.scaling() for c in tasks]
    names = sorted(set().union(*layers))
    method = settings.method
    if method == "cat":
        rank = sum(c.rank() for c in tasks)
    elif method == "linear":
        rank = tasks[0].rank()
    else:
        rank = settings.rank or max(c.rank() for c in tasks)
    generator = torch.Generator().manual_seed(settings.seed)
    body: dict[str, torch.Tensor] = {}
    energy: list[float] = []
    for name in names:
        present = [(i, layer[name]) for i, layer in enumerate(layers) if name in layer]
        if method == "cat":
            a = torch.cat([weights[i] * scales[i] * ab[0] for i, ab in present])
            b = torch.cat([ab[1] for _, ab in present], dim=1)
            a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
            b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        elif method == "linear":
            root = {i: math.sqrt(abs(weights[i]) * scales[i]) for i, _ in present}
            a = torch.stack([math.copysign(root[i], weights[i]) * ab[0] for i, ab in present]).sum(0)
            b = torch.stack([root[i] * ab[1] for i, ab in present]).sum(0)
        else:
            out_f, in_f = present[0][1][1].shape[0], present[0][1][0].shape[1]
            vectors = [
                scales[i] * (layer[name][1] @ layer[name][0]) if name in layer else torch.zeros(out_f, in_f)
                for i, layer in enumerate(layers)
            ]
            delta = merge_vectors(
                vectors, weights, "linear" if method == "svd" else method, settings.density, generator
            )
            a, b, share = refactor(delta, rank)
            energy.append(share)
        body[name + LORA_A], body[name + LORA_B] = a.contiguous(), b.contiguous()
    first = tasks[0].config
    config = {
        **first,
        "rank": rank,
        "alpha": float(rank),
        "rslora": False,
        "use_dora": False,
        "target_modules": names,
    }
    kept: dict[str, Any] = {"rank": rank, "layers": len(names)}
    if energy:
        kept["energy_kept"] = {"min": min(energy), "mean": sum(energy) / len(energy)}
    return body, config, kept


def merge_ia3(
    tasks: Sequence[Constituent], settings: MergeSettings
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The merged (IA)^3 vectors ``1 + merge(l_t - 1)`` (every task must scale the same layers)."""
    keys = [sorted(k for k in c.state if k.endswith(IA3)) for c in tasks]
    if any(k != keys[0] for k in keys):
        raise ConfigError(
            "the (IA)^3 tasks scale different layers; merge tasks trained with the same --ia3-target-modules"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    weights = settings.task_weights(len(tasks))
    body = {
        key: 1.0 + merge_vectors(
            [c.state[key].float() - 1.0 for c in tasks], weights, settings.method, settings.density, generator
        )
        for key in keys[0]
    }  # fmt: skip
    return body, tasks[0].config, {"layers": len(keys[0])}


def merge_bodies(
    tasks: Sequence[Constituent], settings: MergeSettings
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Check the group, then merge: (body tensors, the merged task's method config, a record of the merge)."""
    settings.check(len(tasks))
    check_mergeable(tasks, settings.method)
    merge = merge_lora if tasks[0].method == "lora" else merge_ia3
    body, config, kept = merge(tasks, settings)
    record = {
        "method": settings.method,
        "weights": settings.task_weights(len(tasks)),
        "density": settings.density if settings.method in ("ties", "dare_linear", "dare_ties") else None,
        "seed": settings.seed,
        "tasks": [{"name": c.name, "folder": str(c.folder)} for c in tasks],
        **kept,
    }
    return body, config, record


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
