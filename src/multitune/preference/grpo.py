"""GRPO (Shao et al. 2024, DeepSeekMath, section 4.1) and RLOO (Ahmadian et al. 2024): policy optimisation from
groups of sampled responses, no value head.

Each step takes ``batch_size`` prompts and samples ``group_size`` responses to each, all in one mixed batch of
the bank that trains the adapter (the rollouts are the policy itself: no weight sync to a separate inference
engine). Each response's reward (the same reward functions as ``ppo``: a reward model, a classifier's label
probability or a Python function) gives its advantage against its own group:

- ``--advantage grpo``: A_i = (r_i - mean_g r) / (std_g r + 1e-4) (the paper's outcome supervision);
- ``--advantage rloo``: A_i = r_i - mean of the group's other rewards = G / (G - 1) (r_i - mean_g r).

Every token of a response carries its advantage. The objective per token is PPO's clipped surrogate with the
ratio to the sampling policy, plus ``kl_coef`` times the k3 estimator of KL(pi || ref) against the reference
(the bank with its adapters off, or the initial policy), ``exp(ref - logp) - (ref - logp) - 1`` (unbiased and
non-negative: the paper's eq. 4). ``--loss grpo`` averages each response's tokens and then the responses (the
paper); ``--loss dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-Like Training") sums the tokens and divides
by responses x max_new_tokens, a constant, and uses no std in the advantage, which removes the length and
difficulty biases. ``iterations`` updates per rollout (mu; 1 as TRL's default: the ratio is then 1 at the
step and the clip never binds). Defaults follow TRL's GRPOTrainer where the paper leaves them open, the KL
weight the paper's 0.04.

Written here rather than taken from TRL: its trainer samples with its own model or a vLLM server, not with a
bank's routed task; the pieces (rollout, log-probs, the reference) are PPO's (multitune.preference.ppo).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.encode import collate, encode_task, to_device
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.preference.dpo import REFERENCE_ALIASES, REFERENCE_HELP, REFERENCES
from multitune.preference.ppo import (
    RewardFn,
    _initial_reference,
    _prompt_order,
    _reference_logits,
    _sample_rollout,
    check_policy,
    entropy,
    masked_mean,
    response_outputs,
    token_logprobs,
)
from multitune.preference.rewards import as_scores
from multitune.trackers import check_installed, parse_report_to
from multitune.training.evaluate import autocast
from multitune.training.loop import parameter_groups

ADVANTAGES = ("grpo", "rloo")
LOSSES = ("grpo", "dr_grpo")


@dataclass
class GRPOConfig:
    steps: int = field(default=30, metadata={"help": "GRPO steps (one group rollout and its updates each)"})
    batch_size: int = field(default=4, metadata={"help": "prompts per step"})
    group_size: int = field(default=8, metadata={"help": "responses sampled per prompt (G >= 2)"})
    iterations: int = field(default=1, metadata={"help": "updates per rollout (mu)"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (default: the method's)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest sampled response, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    kl_coef: float = field(default=0.04, metadata={"help": "weight of the k3 KL to the reference (0: none)"})
    cliprange: float = field(default=0.2, metadata={"help": "clip range of the probability ratio"})
    advantage: str = field(
        default="grpo", metadata={"help": "grpo (group-normalised) or rloo (leave one out)"}
    )
    loss: str = field(default="grpo", metadata={"help": "grpo (per-response token mean) or dr_grpo"})
    max_length: int = field(default=256, metadata={"help": "truncate prompts to their last N tokens"})
    reference: str = field(default="disabled", metadata={"help": REFERENCE_HELP})
    seed: int = field(default=0, metadata={"help": "seed of the prompt order and sampling"})

    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment trackers for each step's record: tensorboard, mlflow (comma-separated) or none"
        },
    )

    def __post_init__(self) -> None:
        self.reference = REFERENCE_ALIASES.get(self.reference, self.reference)

    def validate(self) -> list[str]:
        problems = []
        for name in ("steps", "batch_size", "iterations", "max_new_tokens", "max_length"):
            if getattr(self, name) < 1:
                problems.append(
                    f"{name} must be >= 1 (got {getattr(self, name)}); fix --{name.replace('_', '-')}"
                )
        if self.group_size < 2:
            problems.append(
                f"group_size must be >= 2 (got {self.group_size}): an advantage compares a response with the "
                "others of its group; fix --group-size"
            )
        if self.learning_rate is not None and not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0 (got {self.learning_rate})")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (got {self.temperature}); fix --temperature")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p}); fix --top-p")
        for name in ("kl_coef", "max_grad_norm"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not self.cliprange > 0:
            problems.append(f"cliprange must be > 0 (got {self.cliprange})")
        if self.advantage not in ADVANTAGES:
            problems.append(f"advantage must be grpo or rloo (got '{self.advantage}'); fix --advantage")
        if self.loss not in LOSSES:
            problems.append(f"loss must be grpo or dr_grpo (got '{self.loss}'); fix --loss")
        if self.reference not in REFERENCES:
            problems.append(f"reference must be one of {', '.join(REFERENCES)} (got '{self.reference}')")
        try:
            check_installed(parse_report_to(self.report_to))
        except ConfigError as error:
            problems.append(str(error))
        return problems


def group_advantages(
    rewards: torch.Tensor, group_size: int, kind: str = "grpo", scale: bool = True
) -> torch.Tensor:
    """(N,) advantages of rewards (N,) laid out group by group (N = prompts x group_size): GRPO's
    ``(r - mean) / (std + 1e-4)`` (``scale`` False: ``r - mean``, Dr. GRPO's), or RLOO's leave-one-out
    ``r - mean of the others``. The std is the sample std (n - 1), as TRL computes it."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if kind == "rloo":
        return ((groups - mean) * group_size / (group_size - 1)).reshape(-1)
    centred = groups - mean
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: GRPOConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss from token log-probs (B, T) under the policy, the sampler and the reference, the
    responses' advantages (B,) and their mask (B, T); with its statistics (KL, clip fraction)."""
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - config.cliprange, 1 + config.cliprange) * adv)
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1  # k3: unbiased, >= 0
    per_token = -(surrogate - config.kl_coef * kl)
    if config.loss == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * config.max_new_tokens)
    else:
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    clipped = ((ratio - 1).abs() > config.cliprange).float()
    return loss, {
        "kl": float(masked_mean(kl.detach(), mask)),
        "clip_fraction": float(masked_mean(clipped, mask)),
    }


def train_grpo(
    bank: MultiTaskModel,
    task: str,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    config: GRPOConfig,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train generation task ``task`` with GRPO (or RLOO) to maximise ``reward_fn``; returns ``history`` (per step:
    mean score and its spread within groups, KL, entropy, clip fraction, loss, response length, seconds) and
    ``seconds``."""
    check_policy(bank, task, config)
    if not prompts:
        raise ConfigError("no prompts to roll out; give at least one prompt")
    torch.manual_seed(config.seed)
    device = bank.base.device
    tokenizer = bank.base.tokenizer
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    slot = bank.slots.index(task)
    lr = config.learning_rate or get_method(bank.tasks[task].method).default_learning_rate
    keys = list(bank.task_parameters(task))
    groups = [
        {"params": group, "lr": rate}
        for rate, group in parameter_groups(bank, task, keys, lr, TrainConfig(head_learning_rate=lr))
    ]
    params = list(bank.task_parameters(task).values())
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    features = encode_task(
        bank, task, [Example(text=p) for p in prompts], config.max_length, with_target=False
    )
    history: list[dict[str, Any]] = []
    bank.eval()  # no dropout: the update's log-probs must be the sampler's
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"grpo {task}", disable=not progress, dynamic_ncols=True)
    reference, twin = _initial_reference(bank, task) if config.reference == "initial" else (None, None)
    g = config.group_size
    try:
        for step in range(config.steps):
            tick = time.perf_counter()
            rows = _prompt_order(len(features), config.batch_size, config.seed, step)
            repeated = [i for i in rows for _ in range(g)]  # each prompt G times, groups contiguous
            batch = to_device(
                collate([features[i] for i in repeated], pad_id, slot, padding_side="left"), device
            )
            tokens, mask, input_ids, attention = _sample_rollout(bank, batch, config, pad_id, eos_id)
            width, task_ids = batch["input_ids"].shape[1], batch["task_ids"]
            with torch.no_grad(), autocast(bank):
                logits, _ = response_outputs(bank, task_ids, input_ids, attention, width, config.temperature)
                old_logp = token_logprobs(logits, tokens)
                ref_logp = token_logprobs(
                    _reference_logits(
                        bank, task_ids, input_ids, attention, width, config.temperature, reference, twin
                    ),
                    tokens,
                )
                ent = float(masked_mean(entropy(logits), mask))
                del logits
            responses = [
                tokenizer.decode(t[m.bool()], skip_special_tokens=True).strip()
                for t, m in zip(tokens.cpu(), mask.cpu(), strict=True)
            ]
            scores = as_scores(
                reward_fn([prompts[i] for i in repeated], responses), len(responses), "function"
            )
            scores = scores.to(device).float()
            advantages = group_advantages(scores, g, config.advantage, scale=config.loss != "dr_grpo")
            stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": []}
            for _ in range(config.iterations):
                with autocast(bank):
                    logits, _ = response_outputs(
                        bank, task_ids, input_ids, attention, width, config.temperature
                    )
                logp = token_logprobs(logits, tokens)
                loss, parts = grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, config)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(float(loss.detach()))
                for name, value in parts.items():
                    stats[name].append(value)
                del logits, logp, loss
            if not all(math.isfinite(v) for v in stats["loss"]):
                raise ConfigError(
                    f"GRPO diverged at step {step + 1} (the loss is not finite); lower --learning-rate"
                )
            record = {
                "step": step + 1,
                "score": float(scores.mean()),
                "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
                "score_std_in_group": float(scores.view(-1, g).std(dim=1).mean()),
                "entropy": ent,
                **{k: sum(v) / len(v) for k, v in stats.items()},
                "response_length": float(mask.sum(1).mean()),
                "seconds": round(time.perf_counter() - tick, 3),
            }
            history.append(record)
            bar.update(1)
            bar.set_postfix_str(f"score {record['score']:.3f} kl {record['kl']:.3f}", refresh=False)
            if log is not None:
                log(record)
    finally:
        bar.close()
        if twin is not None:
            bank.remove_task(twin)
    return {"history": history, "seconds": time.perf_counter() - start}
