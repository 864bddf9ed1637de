"""PPO for RLHF, in plain view: rollout -> score -> KL-penalised rewards -> GAE -> clipped updates.

The policy is one generation task of a bank (LoRA by default, any method with parameters); the value
head is a small linear layer on the policy's last hidden states, owned by the run. The reference model
is the same base with every adapter off (``bank.disabled()``), so PPO holds one copy of the base, not
two; ``reference="initial"`` (alias ``copy``) is the policy as it starts, frozen: a second task of the
bank holding a copy of the policy's starting parameters (a soft prompt or prefix is not the identity at
its start, so this differs from ``disabled``), or, for full fine-tuning, where the task *is* the base
weights, a separate frozen deep copy of the model (the baseline of the memory comparison).

One step (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; the PPO of
Schulman et al. 2017 with the token-level KL penalty of Stiennon et al. 2020):

1. Rollout: ``batch_size`` prompts, responses sampled with temperature / top-p up to ``max_new_tokens``.
2. One forward over prompt + response gives, per response token, the policy's log-prob and value; one
   more under ``bank.disabled()`` gives the reference log-prob. The reward function scores each
   (prompt, response) once.
3. Per-token reward ``-kl_coef * (logp - ref_logp)``, plus the score at the last response token (by
   default the score less the running mean of every score so far, over their running standard deviation:
   TRL's ``use_score_scaling`` with ``use_score_norm``, so a probability in [0, 1] and a reward model's
   logit weigh the same against the KL); advantages by GAE over the response tokens, returns = advantages
   + values.
4. ``ppo_epochs`` passes over shuffled minibatches: clipped surrogate policy loss, clipped value loss.
5. The adaptive KL controller moves ``kl_coef`` toward the target KL.

Dropout stays off (the bank is in eval mode throughout): the log-probs of the update must be those of
the policy that sampled, or the ratio is noise from step one.

Rewards (:mod:`multitune.preference.rewards`) are functions ``(prompts, responses) -> (N,) tensor``: a Python function
(:func:`reward_from_function`), the probability of a label of a trained classification task
(:func:`reward_from_classifier`) or a trained reward model (:func:`reward_from_model`).

"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.methods import METHODS, get_method
from multitune.preference.dpo import REFERENCE_ALIASES, REFERENCE_HELP, REFERENCES
from multitune.preference.rewards import as_scores
from multitune.preference.scoring import trainable_methods
from multitune.trackers import check_installed, parse_report_to
from multitune.training.evaluate import autocast
from multitune.training.loop import parameter_groups

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


class PolicyRun(Protocol):
    """What the shared rollout and checks read of a run's settings (PPOConfig, GRPOConfig)."""

    reference: str
    temperature: float
    top_p: float
    max_new_tokens: int

    def validate(self) -> list[str]: ...


VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOConfig:
    steps: int = field(default=30, metadata={"help": "PPO steps (one rollout and its updates each)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per rollout"})
    minibatch_size: int = field(default=8, metadata={"help": "rollout rows per optimizer step"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (default: the method's)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest sampled response, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling: keep the smallest token set of this mass"}
    )
    init_kl_coef: float = field(default=0.2, metadata={"help": "initial weight of the per-token KL penalty"})
    target_kl: float = field(
        default=6.0,
        metadata={
            "help": "KL (nats per response) the adaptive controller aims at (0 = a fixed KL coefficient)"
        },
    )
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon, in samples"})
    gamma: float = field(default=1.0, metadata={"help": "discount over response tokens"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip range of the probability ratio"})
    cliprange_value: float = field(default=0.2, metadata={"help": "clip range of the value update"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages per rollout"})
    score_norm: bool = field(
        default=True,
        metadata={
            "help": "score minus the running mean of all scores so far, over their running std, before the KL "
            "penalty (the reward's scale then does not set its weight against the KL)"
        },
    )
    max_length: int = field(default=256, metadata={"help": "truncate prompts to their last N tokens"})
    reference: str = field(default="disabled", metadata={"help": REFERENCE_HELP})
    seed: int = field(default=0, metadata={"help": "seed of the value head, prompt order and sampling"})

    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers for each step's record: tensorboard, mlflow (comma-separated) or none"
        },
    )

    def __post_init__(self) -> None:
        self.reference = REFERENCE_ALIASES.get(self.reference, self.reference)  # 'copy' is 'initial'

    def validate(self) -> list[str]:
        problems = []
        for name in (
            "steps",
            "batch_size",
            "minibatch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_length",
            "kl_horizon",
        ):
            if getattr(self, name) < 1:
                problems.append(
                    f"{name} must be >= 1 (got {getattr(self, name)}); fix --{name.replace('_', '-')}"
                )
        if self.learning_rate is not None and self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (got {self.temperature}); fix --temperature")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p}); fix --top-p")
        for name in ("init_kl_coef", "target_kl", "max_grad_norm", "vf_coef"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.reference not in REFERENCES:
            problems.append(
                f"reference must be one of {', '.join(REFERENCES)} (got '{self.reference}'); fix --reference"
            )
        try:
            check_installed(parse_report_to(self.report_to))
        except ConfigError as error:
            problems.append(str(error))
        return problems


# ---- the pieces ------------------------------------------------------------------------------------
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.

    KL above the target raises the coefficient (a stronger pull toward the reference), below lowers it.
    ``target=0`` keeps the coefficient fixed.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update, batch by batch)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.double().mean())
        batch_m2 = float(((values.double() - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalise(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``values`` after adding them to the moments: (values - mean) / std (std floored at eps)."""
        self.update(values)
        return (values - self.mean) / max(self.std, eps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the unmasked entries (masked entries stay 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, T) response tokens.

    ``mask`` is 1 on each row's response tokens, which start at column 0 (padding only trails), so the
    value after a row's last token is 0: the episode ends there. Returns (advantages, returns), both 0
    on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) (B, T) from logits (B, T, V)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (B, T) of the next-token distributions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 on each response's tokens up to and including its first EOS (what follows is padding)."""
    if eos_id is None:
        return torch.ones_like(tokens, dtype=torch.float32)
    is_eos = (tokens == eos_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).float()


def make_value_head(hidden_size: int, device: torch.device | str = "cpu") -> nn.Linear:
    """A linear value head, started near zero so the first values do not swamp the first advantages."""
    head = nn.Linear(hidden_size, 1, device=device)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (hidden_size + 1))
        head.bias.zero_()
    return head


def save_value_head(head: nn.Linear, path: str | Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_value_head(path: str | Path, device: torch.device | str = "cpu") -> nn.Linear:
    state = load_file(str(path))
    head = nn.Linear(state["weight"].shape[1], 1, device=device)
    head.load_state_dict(state)
    return head


def response_outputs(
    bank: MultiTaskModel,
    task_ids: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
    value_head: nn.Module | None = None,
    model: PreTrainedModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, T, V) of the T response tokens (each from the position before it) and values (B, T).

    ``input_ids`` is [left-padded prompts | right-padded responses]. The LM head runs on the response
    positions only: a vocabulary of 50k times the whole prompt would dominate memory. Positions count
    unmasked tokens, as ``generate`` counts them, so the log-probs are those of the policy that sampled.
    ``model`` is a separate reference copy of the base (run as a plain model, no routing).
    """
    if model is None:
        routed = bank.run(input_ids, attention_mask, task_ids, backbone=True)
        hidden = routed.out.last_hidden_state[:, routed.width :]
        head = bank.base.model.get_output_embeddings()
    else:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state
        head = model.get_output_embeddings()
    hidden = hidden[:, prompt_width - 1 : -1]
    logits = head(hidden).float() / temperature
    values = value_head(hidden.float()).squeeze(-1) if value_head is not None else None
    return logits, values


# ---- the loop --------------------------------------------------------------------------------------
def check_policy(bank: MultiTaskModel, task: str, config: PolicyRun) -> None:
    """The errors a PPO run would otherwise hit late: wrong kind, architecture, method or reference."""
    spec = bank.spec(task)
    problems = config.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    if spec.kind != "generation":
        raise ConfigError(f"task '{task}' is a {spec.kind} task; PPO and GRPO train a generation task")
    if bank.base.arch != "decoder":
        raise ConfigError(
            f"PPO here needs a causal LM (decoder); {bank.base.source} is {bank.base.arch}. "
            "Use a decoder such as smollm2-135m"
        )
    method = get_method(spec.method)
    if method.fit is not None or not bank.task_parameters(task):
        raise ConfigError(
            f"method '{spec.method}' has no trainable parameters for PPO to update; choose one of: "
            f"{', '.join(trainable_methods())}"
        )
    if method.changes_base and config.reference == "disabled":
        raise ConfigError(
            f"'{spec.method}' trains the base weights themselves, so the base with adapters off is no "
            "reference; pass --reference initial (a frozen copy of the starting model)"
        )


def _initial_reference(bank: MultiTaskModel, task: str) -> tuple[PreTrainedModel | None, str | None]:
    """The policy as it starts, frozen: (a deep copy of the model, None) when the task owns the base
    weights, else (None, the name of a twin task holding a copy of the policy's parameters)."""
    spec = bank.tasks[task]
    if get_method(spec.method).changes_base:
        return copy.deepcopy(bank.base.model).requires_grad_(False).eval(), None
    twin = next(n for n in (f"{task[:54]}-reference{i or ''}" for i in range(100)) if n not in bank.tasks)
    bank.add_task(
        twin, spec.kind, spec.method, METHODS[spec.method].config_class(**spec.config), spec.labels or None
    )
    bank.load_task_state_dict(twin, {k: v.detach().clone() for k, v in bank.task_state_dict(task).items()})
    for param in bank.task_parameters(twin).values():
        param.requires_grad_(False)
    return None, twin


def _prompt_order(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The prompts of rollout ``step``: consecutive slices of seeded permutations (a pure function of the step)."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out += order[offset : offset + batch_size - len(out)]
    return out


def _value_head_and_optimizer(
    bank: MultiTaskModel, task: str, config: PPOConfig, value_head: nn.Linear | None
) -> tuple[nn.Linear, list[nn.Parameter], torch.optim.Optimizer]:
    """The value head (a fresh one from the global generator the caller seeded, unless one is given), the
    parameters PPO updates (the policy task's and the value head's: one loss moves both) and their AdamW, at
    ``--learning-rate`` or the method's default: the policy's parameters grouped as the training loop groups
    them (:func:`multitune.training.loop.parameter_groups`: the method's per-parameter scales), the value head
    at the learning rate."""
    device = bank.base.device
    value_head = value_head if value_head is not None else make_value_head(bank.base.hidden_size, device)
    params = list(bank.task_parameters(task).values()) + list(value_head.parameters())
    lr = config.learning_rate or get_method(bank.tasks[task].method).default_learning_rate
    keys = list(bank.task_parameters(task))
    groups = [
        {"params": group, "lr": rate}
        for rate, group in parameter_groups(bank, task, keys, lr, TrainConfig(head_learning_rate=lr))
    ]
    optimizer = torch.optim.AdamW(
        [*groups, {"params": list(value_head.parameters()), "lr": lr}], weight_decay=0.0
    )
    return value_head, params, optimizer


def _sample_rollout(
    bank: MultiTaskModel, batch: dict[str, torch.Tensor], config: PolicyRun, pad_id: int, eos_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1: sample a response per prompt; returns (tokens (B, T) padded past each response's end, their
    mask (B, T), input_ids and attention mask of [left-padded prompts | right-padded responses])."""
    with torch.no_grad(), autocast(bank):
        tokens = bank.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["task_ids"],
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=0,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=eos_id,
        )
    mask = response_mask(tokens, eos_id)  # (B, T)
    tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_id))
    input_ids = torch.cat([batch["input_ids"], tokens], dim=1)
    attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
    return tokens, mask, input_ids, attention


def _reference_logits(
    bank: MultiTaskModel,
    task_ids: torch.Tensor,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    width: int,
    temperature: float,
    reference: PreTrainedModel | None,
    twin: str | None,
) -> torch.Tensor:
    """The reference policy's logits of the response tokens, from whichever reference the run holds: the
    frozen twin task of the starting policy (routed as a task of its own), the base with every adapter off,
    or the separate frozen copy of a fully fine-tuned model. Called under no_grad."""
    if twin is not None:
        twin_ids = bank.task_ids(twin, len(task_ids))
        return response_outputs(bank, twin_ids, input_ids, attention, width, temperature)[0]
    if reference is None:
        with bank.disabled():
            return response_outputs(bank, task_ids, input_ids, attention, width, temperature)[0]
    return response_outputs(bank, task_ids, input_ids, attention, width, temperature, model=reference)[0]


def train_ppo(
    bank: MultiTaskModel,
    task: str,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    config: PPOConfig,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    value_head: nn.Linear | None = None,
) -> dict[str, Any]:
    """Train generation task ``task`` of ``bank`` with PPO to maximise ``reward_fn``; returns the history.

    The result holds ``history`` (one record per step: mean reward with the KL penalty, mean score, KL,
    kl_coef, entropy, clip fraction, approx KL, policy loss, value loss, response length, seconds),
    ``value_head`` (the trained module), ``kl_coef`` and ``seconds``. ``log(record)`` is called after
    each step.
    """
    # ---- setup -------------------------------------------------------------------------------------
    check_policy(bank, task, config)
    if not prompts:
        raise ConfigError("no prompts to roll out; give at least one prompt")
    torch.manual_seed(config.seed)
    device = bank.base.device
    tokenizer = bank.base.tokenizer
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    slot = bank.slots.index(task)
    value_head, params, optimizer = _value_head_and_optimizer(bank, task, config, value_head)
    kl_control = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
    moments = RunningMoments()
    features = encode_task(
        bank, task, [Example(text=p) for p in prompts], config.max_length, with_target=False
    )
    shuffle = torch.Generator().manual_seed(config.seed + 1)
    history: list[dict[str, Any]] = []
    bank.eval()  # no dropout: the update's log-probs must be the sampler's
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"ppo {task}", disable=not progress, dynamic_ncols=True)
    reference, twin = _initial_reference(bank, task) if config.reference == "initial" else (None, None)
    try:
        for step in range(config.steps):
            tick = time.perf_counter()
            # ---- 1. rollout ------------------------------------------------------------------------
            rows = _prompt_order(len(features), config.batch_size, config.seed, step)
            batch = to_device(collate([features[i] for i in rows], pad_id, slot, padding_side="left"), device)
            tokens, mask, input_ids, attention = _sample_rollout(bank, batch, config, pad_id, eos_id)
            width = batch["input_ids"].shape[1]
            task_ids = batch["task_ids"]
            # ---- 2. old log-probs, values, reference log-probs, scores ---------------------------------
            with torch.no_grad(), autocast(bank):
                logits, values = response_outputs(
                    bank, task_ids, input_ids, attention, width, config.temperature, value_head
                )
                assert values is not None  # (given a value head, response_outputs returns values)
                old_logp = token_logprobs(logits, tokens)
                ref_logits = _reference_logits(
                    bank, task_ids, input_ids, attention, width, config.temperature, reference, twin
                )
                ref_logp = token_logprobs(ref_logits, tokens)
                del logits, ref_logits
            responses = [
                tokenizer.decode(t[m.bool()], skip_special_tokens=True).strip()
                for t, m in zip(tokens.cpu(), mask.cpu(), strict=True)
            ]
            prompt_texts = [prompts[i] for i in rows]
            scores = as_scores(reward_fn(prompt_texts, responses), len(responses), "function").to(device)
            # ---- 3. rewards, advantages ---------------------------------------------------------------
            kl_tokens = (old_logp - ref_logp) * mask
            rewards = -kl_control.value * kl_tokens
            last = (mask.sum(1).long() - 1).clamp(min=0)
            shaped = moments.normalise(scores) if config.score_norm else scores
            rewards[torch.arange(len(rows), device=device), last] += shaped
            values = values * mask
            advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                advantages = whiten(advantages, mask)
            # ---- 4. PPO epochs over minibatches ----------------------------------------------------------
            stats: dict[str, list[float]] = {
                "policy_loss": [],
                "value_loss": [],
                "entropy": [],
                "clip_fraction": [],
                "approx_kl": [],
            }
            for _ in range(config.ppo_epochs):
                order = torch.randperm(len(rows), generator=shuffle).to(device)
                for first in range(0, len(rows), config.minibatch_size):
                    idx = order[first : first + config.minibatch_size]
                    m = mask[idx]
                    with autocast(bank):
                        logits, new_values = response_outputs(
                            bank,
                            task_ids[idx],
                            input_ids[idx],
                            attention[idx],
                            width,
                            config.temperature,
                            value_head,
                        )
                    assert new_values is not None  # (given a value head, response_outputs returns values)
                    logp = token_logprobs(logits, tokens[idx])
                    ratio = torch.exp(logp - old_logp[idx])
                    adv = advantages[idx]
                    surrogate = -adv * ratio
                    clipped = -adv * ratio.clamp(1 - config.cliprange, 1 + config.cliprange)
                    policy_loss = masked_mean(torch.max(surrogate, clipped), m)
                    old_v, ret = values[idx], returns[idx]
                    v_clipped = old_v + (new_values - old_v).clamp(
                        -config.cliprange_value, config.cliprange_value
                    )
                    value_loss = 0.5 * masked_mean(
                        torch.max((new_values - ret) ** 2, (v_clipped - ret) ** 2), m
                    )
                    loss = policy_loss + config.vf_coef * value_loss
                    loss.backward()
                    if config.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        stats["policy_loss"].append(float(policy_loss))
                        stats["value_loss"].append(float(value_loss))
                        stats["entropy"].append(float(masked_mean(entropy(logits), m)))
                        stats["clip_fraction"].append(float(masked_mean((clipped > surrogate).float(), m)))
                        stats["approx_kl"].append(float(0.5 * masked_mean((logp - old_logp[idx]) ** 2, m)))
                    del logits, logp, loss
            # ---- 5. KL controller, record --------------------------------------------------------------
            kl = float(kl_tokens.sum(1).mean())
            if not math.isfinite(kl):
                raise ConfigError(
                    f"PPO diverged at step {step + 1} (the KL to the reference is not finite); "
                    "lower --learning-rate or raise --init-kl-coef"
                )
            coef = kl_control.value
            record = {
                "step": step + 1,
                "reward": float((scores - coef * kl_tokens.sum(1)).mean()),
                "score": float(scores.mean()),
                "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
                "kl": kl,
                "kl_coef": coef,
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "response_length": float(mask.sum(1).mean()),
                "seconds": round(time.perf_counter() - tick, 3),
            }
            kl_control.update(kl, len(rows))
            history.append(record)
            bar.update(1)
            bar.set_postfix_str(f"score {record['score']:.3f} kl {kl:.3f}", refresh=False)
            if log is not None:
                log(record)
    finally:
        bar.close()
        if twin is not None:
            bank.remove_task(twin)
    return {
        "history": history,
        "value_head": value_head,
        "kl_coef": kl_control.value,
        "seconds": time.perf_counter() - start,
    }
