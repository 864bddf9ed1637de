"""Differential privacy for adapter training: DP-SGD (Abadi et al. 2016, "Deep Learning with Differential
Privacy", Algorithm 1) over a task's own parameters.

Each step draws a Poisson batch (every training example independently with probability q = batch_size / n,
so a batch's size varies and may be 0), computes every example's gradient g_i of the task's parameters (the
adapter's and its head's; the frozen base has none), clips each to norm C (g_i * min(1, C / ||g_i||), the norm
taken over all of the task's parameters at once), and hands AdamW

    g = (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / (q n)

(the expected batch size in the denominator, as Opacus does for Poisson sampling: a data-dependent batch size
would leak). The noise multiplier sigma is chosen before the run so that its steps reach ``--dp-epsilon`` at
``--dp-delta`` under Opacus' accountant (PRV, Gopi et al. 2021, by default; RDP, Mironov 2017), and the epsilon
the steps actually taken spent (early stopping spends less) is recorded in result.json. Choosing the best
evaluation on the validation split is post-processing of models that are each private, so it costs nothing
of the training data's budget (the validation data itself is not protected).

Why the per-sample gradients are ours and not Opacus' ``GradSampleModule``: its grad samplers are written per
layer type (``nn.Linear``, ``nn.Embedding``, ...), and our methods are not such layers: a LoRA wrapper reads
per-task ``ParameterDict``s through the routing, a soft prompt is concatenated in front of the embeddings, a
prefix enters through the attention cache. ``torch.func`` differentiates the bank's own forward instead
(``functional_call`` over the task's parameters, ``grad`` of one example's loss, ``vmap`` over the batch),
whatever a method does inside it; the tests check every method's per-sample gradients against a batch of one.
Opacus is used for what it is the reference of: the accountants and ``get_noise_multiplier``.

Under ``vmap`` a tensor's values cannot steer Python control flow, and transformers' mask builders ask
``padding_mask.all()`` to skip building a mask when nothing is padded. :func:`_masks_built` makes them build it
always (the same attention, without the shortcut) for the per-sample forward only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
DEFAULT_DELTA = 1e-5
# Methods DP-SGD is refused for, and why (one line each).
REFUSED = {
    "full": "full fine-tuning trains every weight of the base: per-sample gradients would hold batch_size copies "
    "of the model, and noise over millions of weights drowns the signal; use an adapter method "
    "(lora, ia3, prompt, prefix, adapter)",
    "prompting": "prompting puts training examples verbatim into the prompt, which no gradient noise can hide; "
    "use a trained method (lora, ia3, prompt, prefix, adapter)",
}


def default_delta(n: int) -> float:
    """delta when none is given: 1/n^1.1 or 1e-5, whichever is smaller (delta must be well below 1/n: a
    mechanism that publishes one random example whole is (0, 1/n)-DP)."""
    return min(1.0 / n**1.1, DEFAULT_DELTA)


@dataclass
class PrivacyPlan:
    """A run's DP-SGD settings: the target (epsilon, delta), the calibrated noise multiplier sigma, the
    clipping norm C, the Poisson sample rate q and the steps sigma was calibrated for."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str

    def spent(self, steps: int) -> float:
        """The epsilon ``steps`` steps of this plan spend (at most the target, for steps <= self.steps)."""
        return spent_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)

    def record(self, steps: int) -> dict[str, Any]:
        """result.json's ``dp``: the epsilon spent by the steps taken, and the settings that spent it."""
        return {
            "epsilon": round(self.spent(steps), 4),
            "target_epsilon": self.epsilon,
            "delta": self.delta,
            "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "accountant": self.accountant,
        }


def _accountant(name: str) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError as error:
        raise ConfigError(
            "--dp-epsilon needs the opacus package (its privacy accountant); pip install 'multitune[dp]'"
        ) from error
    return PRVAccountant() if name == "prv" else RDPAccountant()


def spent_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    """epsilon of ``steps`` Poisson-sampled Gaussian steps (sigma, q) at ``delta``, by Opacus' accountant."""
    if steps <= 0:
        return 0.0
    account = _accountant(accountant)
    account.history = [(noise_multiplier, sample_rate, steps)]  # what ``steps`` calls of .step() leave
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(account.get_epsilon(delta=delta))


def problems(config: TrainConfig, n: int, method: str) -> list[str]:
    """What is wrong with the DP settings of a run of ``method`` on ``n`` examples, each with its fix."""
    if config.dp_epsilon is None:
        return []
    out = []
    if not config.dp_epsilon > 0:
        out.append(
            f"--dp-epsilon must be > 0 (got {config.dp_epsilon}): epsilon bounds how much one example can change "
            "what the run publishes; 1-10 is usual"
        )
    if config.dp_delta is not None and not 0 < config.dp_delta < 1 / n:
        out.append(
            f"--dp-delta must be in (0, 1/n) = (0, {1 / n:.3g}) for n = {n} training examples (got {config.dp_delta}): "
            f"with delta >= 1/n, publishing one example whole would be allowed; leave it out for {default_delta(n):.3g}"
        )
    if not config.dp_max_grad_norm > 0:
        out.append(f"--dp-max-grad-norm must be > 0 (got {config.dp_max_grad_norm})")
    if config.dp_accountant not in ACCOUNTANTS:
        out.append(f"--dp-accountant must be one of {', '.join(ACCOUNTANTS)} (got '{config.dp_accountant}')")
    if config.grad_accum != 1:
        out.append(
            "--grad-accum must be 1 with --dp-epsilon: each Poisson batch is one noised step; raise --batch-size "
            "instead (per-sample gradients are computed in chunks of it anyway)"
        )
    if config.gradient_checkpointing:
        out.append(
            "--gradient-checkpointing with --dp-epsilon: DP-SGD's per-example gradients (torch.func) cannot "
            "recompute the blocks (torch.func has no saved-tensor hooks); leave it out and lower --batch-size "
            "instead (per-example gradients are computed in chunks of it)"
        )
    if method in REFUSED:
        out.append(f"--dp-epsilon with --method {method}: {REFUSED[method]}")
    return out


def check(config: TrainConfig, n: int, method: str) -> None:
    """Raise one ConfigError listing every problem of the DP settings (:func:`problems`)."""
    found = problems(config, n, method)
    if found:
        raise ConfigError("; ".join(found))


def plan(config: TrainConfig, n: int, method: str, steps: int) -> PrivacyPlan:
    """The noise multiplier that makes ``steps`` steps at q = batch_size / n reach ``config.dp_epsilon``."""
    check(config, n, method)
    if config.dp_epsilon is None:
        raise ConfigError("no --dp-epsilon given; pass --dp-epsilon E to train with differential privacy")
    delta = config.dp_delta if config.dp_delta is not None else default_delta(n)
    q = min(1.0, config.batch_size / n)
    _accountant(config.dp_accountant)  # the install hint before anything else
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sigma = get_noise_multiplier(
            target_epsilon=config.dp_epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=config.dp_accountant,
        )
    return PrivacyPlan(
        config.dp_epsilon, delta, float(sigma), config.dp_max_grad_norm, q, steps, config.dp_accountant
    )


class PoissonBatches:
    """The loop's batches (:class:`multitune.training.loop.Batches`) under DP-SGD: ``ceil(n / batch_size)``
    steps per epoch, each taking every example independently with probability ``q``. A batch is a function of
    (seed, epoch, index) alone, so a resumed run draws the same ones."""

    def __init__(self, n: int, sample_rate: float, batch_size: int, seed: int) -> None:
        self.n, self.q, self.batch_size, self.seed = n, sample_rate, batch_size, seed

    def count(self, epoch: int) -> int:
        return math.ceil(self.n / self.batch_size)

    def get(self, epoch: int, index: int, active: Sequence[bool]) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + index)
        return (torch.rand(self.n, generator=generator) < self.q).nonzero().flatten().tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


@contextmanager
def _masks_built() -> Iterator[None]:
    """transformers' mask builders never take their "nothing is padded" shortcut (see the module docstring)."""
    import transformers.masking_utils as masking

    tracing = masking.is_tracing
    masking.is_tracing = lambda tensor=None: True
    try:
        yield
    finally:
        masking.is_tracing = tracing


def per_sample_gradients(
    bank: MultiTaskModel, task: str, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each row's gradient of its own loss with respect to ``task``'s parameters (key -> (B, *shape)), and
    the rows' losses (B,).

    ``batch`` is a collated batch of ``task``'s rows. Every row runs the bank's forward alone (as a batch of
    one, its padding masked), so its gradient is what a batch of one would give; dropout draws differ per row.
    """
    from torch.func import functional_call, grad_and_value, vmap

    params = bank.task_parameters(task)
    names = {id(p): name for name, p in bank.named_parameters()}
    path = {key: names[id(p)] for key, p in params.items()}
    task_ids = batch["task_ids"][:1]  # not mapped: every row routes to the one task (the fast path)
    rows = {k: v for k, v in batch.items() if k != "task_ids"}

    def loss(weights: dict[str, torch.Tensor], row: dict[str, torch.Tensor]) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in row.items()} | {"task_ids": task_ids}
        return functional_call(bank, {path[k]: w for k, w in weights.items()}, (one,))

    weights = {k: p.detach() for k, p in params.items()}
    with _masks_built(), warnings.catch_warnings():  # "no batching rule for SDPA": vmap loops it, correctly
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        grads, losses = vmap(grad_and_value(loss), in_dims=(None, 0), randomness="different")(weights, rows)
    count = batch["input_ids"].shape[0]
    missing = [k for k in params if k not in grads or grads[k].shape != (count, *params[k].shape)]
    if missing:  # opacus#820's failure: parameters trained on noise alone, silently
        raise RuntimeError(f"no per-sample gradient for {', '.join(missing)} of task '{task}'")
    return grads, losses.detach()


def clipped_sum(
    grads: dict[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """sum_i g_i * min(1, C / ||g_i||) over the rows of per-sample ``grads`` (key -> (B, ...)), the norm over
    all keys at once; and the rows' norms before clipping (B,)."""
    flat = [g.flatten(1).float() for g in grads.values()]
    norms = torch.cat(flat, dim=1).norm(dim=1)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}, norms


def private_step(
    bank: MultiTaskModel,
    task: str,
    privacy: PrivacyPlan,
    n: int,
    batch_of: Callable[[list[int]], dict[str, torch.Tensor]],
    chunk: int,
) -> Callable[[list[int]], dict[str, float]]:
    """The loop's ``Objective.gradients`` under DP-SGD: for a Poisson batch of row indices, set every
    parameter's ``.grad`` to the clipped, noised, scaled sum (module docstring); returns the step's statistics:
    the batch's mean loss (what the forward gave anyway; a log, not covered by the privacy guarantee), its
    size and the fraction of its rows whose gradient was clipped."""
    params = bank.task_parameters(task)
    expected = privacy.sample_rate * n

    def gradients(rows: list[int]) -> dict[str, float]:
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        clipped, loss = 0, 0.0
        for start in range(0, len(rows), chunk):  # memory: chunk x the task's parameters
            grads, losses = per_sample_gradients(bank, task, batch_of(rows[start : start + chunk]))
            loss += float(losses.sum())
            summed, norms = clipped_sum(grads, privacy.max_grad_norm)
            clipped += int((norms > privacy.max_grad_norm).sum())
            for k in total:
                total[k] += summed[k]
        std = privacy.noise_multiplier * privacy.max_grad_norm
        for k, p in params.items():
            noise = torch.normal(0.0, std, p.shape, device=p.device, dtype=p.dtype)
            p.grad = (total[k] + noise) / expected
        seen = max(len(rows), 1)
        return {"loss": loss / seen, "batch": float(len(rows)), "clipped": clipped / seen}

    return gradients


def dp_sgd(
    bank: MultiTaskModel,
    task: str,
    n: int,
    config: TrainConfig,
    batch_of: Callable[[list[int]], dict[str, torch.Tensor]],
) -> tuple[PrivacyPlan, PoissonBatches, Callable[[list[int]], dict[str, float]]]:
    """What a single-task run needs to train ``task`` on its ``n`` examples with DP-SGD: the plan (sigma
    calibrated to the run's steps), the Poisson batches and the loop's ``Objective.gradients``.
    ``batch_of(rows)`` collates the rows with those indices onto the bank's device."""
    from multitune.training.loop import total_steps

    steps = total_steps(config, math.ceil(n / config.batch_size))
    privacy = plan(config, n, bank.tasks[task].method, steps)
    batches = PoissonBatches(n, privacy.sample_rate, config.batch_size, config.seed)
    return privacy, batches, private_step(bank, task, privacy, n, batch_of, config.batch_size)
