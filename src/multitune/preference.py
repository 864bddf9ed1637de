"""Preference tuning: pairs of responses to one prompt, a reward model, and DPO.

Data: a file of (prompt, chosen, rejected) rows, or Anthropic HH rows whose ``chosen`` and ``rejected`` are
whole dialogues (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``); those are split into the shared prompt (up to and
including the last ``"\\n\\nAssistant:"``) and the two responses. Prompt-only files feed PPO.

Reward model (Ouyang et al. 2022, section 3.5): a classification task with labels ``["rejected", "chosen"]``
on an adapter over the frozen base; its score is ``logit[chosen] - logit[rejected]``, a scalar head (the
Bradley-Terry model only ever reads differences of scores), trained on ``-log sigmoid(s_chosen - s_rejected)``.

DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` with p/r the summed
log-probabilities of a response under the policy and the reference. The reference is the same bank with
every adapter off (:meth:`MultiTaskModel.disabled`): no second copy of the model. Its log-probabilities never
change, so they are computed once per pair before the first update.

Both loops run the model in eval mode (dropout off, as TRL does by default): with dropout the policy differs
from the reference before any update and the two scores of a pair carry independent noise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from multitune.bank import MultiTaskModel, TaskSpec
from multitune.config import TrainConfig, plural
from multitune.data import Example, read_table
from multitune.encode import IGNORE, collate, encode_task, prompt_ids, to_device
from multitune.errors import ConfigError, DataError
from multitune.evaluate import _autocast
from multitune.methods import METHODS, get_method
from multitune.models import supports_logits_to_keep
from multitune.training.loop import Objective, Shuffled, fit

ASSISTANT = "\n\nAssistant:"  # the HH turn marker the prompt ends with
REWARD_LABELS = ["rejected", "chosen"]  # score = logit[chosen] - logit[rejected]
SHOWN = 5  # row numbers an error message lists before "..."
TIE = 1e-4  # implicit-reward differences (nats) this small are ties: float noise of a policy equal to its reference
# The reference models of DPO and PPO, one name set for both; "copy" was PPO's name for "initial".
REFERENCES = {"disabled": "the base with every adapter off (no copy of the model)",
              "initial": "the policy as it starts, frozen (with --init-adapter: that adapter, e.g. the SFT model)"}
REFERENCE_ALIASES = {"copy": "initial"}
REFERENCE_HELP = ("reference model: " + "; ".join(f"{k}: {v}" for k, v in REFERENCES.items())
                  + "; 'copy' is accepted for initial")


def reference_name(name: str) -> str:
    """The reference's canonical name (an alias such as 'copy' -> 'initial'); an unknown one is a ConfigError."""
    name = REFERENCE_ALIASES.get(name, name)
    if name not in REFERENCES:
        raise ConfigError(f"reference must be one of {', '.join(REFERENCES)} (got '{name}'); fix --reference")
    return name


@dataclass(frozen=True)
class Pair:
    """One preference: two responses to ``prompt``, ``chosen`` preferred over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str


# ---- data ---------------------------------------------------------------------------------------------
def split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of two HH dialogues, or None when they share no prompt.

    The prompt ends at the last ``"\\n\\nAssistant:"`` of each. A few real HH rows (5 of the 2312 of
    harmless-base test) diverge at an earlier assistant turn, with an extra turn inside one response;
    their prompt is then the dialogue up to the last assistant turn before they diverge, which is the
    same split whenever the last-turn prompts agree.
    """
    c, r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if c >= 0 and r >= 0 and chosen[:c] == rejected[:r]:
        end = c + len(ASSISTANT)
        return chosen[:end], chosen[end:], rejected[r + len(ASSISTANT):]
    at = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
    if at < 0:
        return None
    end = at + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _shown(items: Sequence[object]) -> str:
    return ", ".join(str(i) for i in items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def _line_numbers(path: Path, count: int) -> tuple[str, list[int]]:
    """How rows are named in messages: by their line in a JSON Lines file (blank lines skipped), else by row."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        lines = [n for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1) if line.strip()]
        if len(lines) == count:
            return "line", lines
    return "row", list(range(1, count + 1))


def _text(value: object, where: str, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, list | dict):
        raise DataError(f"{where}: '{key}' holds a {'list' if isinstance(value, list) else 'object'}, not text; "
                        "conversational (message-list) pairs are not supported, give the texts")
    return str(value)


def load_pairs(path: str | Path, drop_empty: bool = False) -> list[Pair]:
    """Preference pairs from a .jsonl/.json/.csv/.tsv/.parquet file.

    Each row has ``prompt``, ``chosen`` and ``rejected`` (the responses alone), or only ``chosen`` and
    ``rejected`` as whole HH dialogues (see :func:`split_dialogues`). Rows with an empty chosen or
    rejected response raise :class:`DataError` naming them, unless ``drop_empty`` drops them (4 rows of
    the HH harmless-base test file have an empty chosen response).
    """
    path = Path(path)
    rows = read_table(path)  # missing file, bad JSON line (by number), wrong format: DataError
    unit, numbers = _line_numbers(path, len(rows))
    pairs: list[Pair] = []
    missing: dict[str, list[int]] = {}
    empty: list[int] = []
    for row, number in zip(rows, numbers, strict=True):
        where = f"{unit} {number} of {path}"
        absent = [k for k in ("chosen", "rejected") if k not in row]
        if absent:
            missing.setdefault("', '".join(absent), []).append(number)
            continue
        chosen, rejected = _text(row["chosen"], where, "chosen"), _text(row["rejected"], where, "rejected")
        if "prompt" in row:
            pair = Pair(_text(row["prompt"], where, "prompt"), chosen, rejected)
        else:
            parts = split_dialogues(chosen, rejected)
            if parts is None:
                raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt ending in an "
                                f"{ASSISTANT.strip()!r} turn; HH rows must be two continuations of one "
                                "dialogue, or give a 'prompt' column with the responses alone")
            pair = Pair(*parts)
        if not pair.chosen.strip() or not pair.rejected.strip():
            empty.append(number)
        else:
            pairs.append(pair)
    if missing:
        keys, numbers_ = next(iter(missing.items()))
        first = rows[numbers.index(numbers_[0])]
        count = sum(map(len, missing.values()))
        more = f" (and {plural(count - 1, unit)} more)" if count > 1 else ""
        raise DataError(f"{unit} {numbers_[0]} of {path} lacks '{keys}'{more}; each row needs 'prompt', 'chosen' "
                        f"and 'rejected', or HH dialogues in 'chosen' and 'rejected' (its keys: "
                        f"{', '.join(first) or 'none'})")
    if empty and not drop_empty:
        raise DataError(f"{path}: {plural(len(empty), unit)} with an empty chosen or rejected response "
                        f"({unit} {_shown(empty)}); remove them or pass --drop-empty")
    if not pairs:
        raise DataError(f"{path}: every pair has an empty chosen or rejected response; fill them in")
    return pairs


def load_prompts(path: str | Path) -> list[str]:
    """Prompts for PPO: a ``prompt`` (or ``text``) column, the prompts of a pairs file, or .txt lines.

    Files with ``chosen``/``rejected`` and no ``prompt`` are read as pairs (:func:`load_pairs`, empty
    responses dropped), so an HH file gives its dialogue prompts.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path} does not exist; check the path")
        prompts = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"{path} has no prompts; write one prompt per line")
        return prompts
    rows = read_table(path)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    column = next((k for k in ("prompt", "text") if k in keys), None)
    if column is None:
        if "chosen" in keys and "rejected" in keys:
            return [p.prompt for p in load_pairs(path, drop_empty=True)]
        raise DataError(f"{path} has no 'prompt' or 'text' column (columns: {', '.join(keys)}); give one prompt "
                        "per row under 'prompt', or a file of chosen/rejected pairs")
    unit, numbers = _line_numbers(path, len(rows))
    prompts = [_text(row.get(column), f"{unit} {n} of {path}", column) for row, n in zip(rows, numbers, strict=True)]
    empty = [n for n, p in zip(numbers, prompts, strict=True) if not p.strip()]
    if empty:
        raise DataError(f"{path}: {plural(len(empty), unit)} with an empty '{column}' ({unit} {_shown(empty)}); "
                        "fill them in or remove them")
    return prompts


def split_pairs(pairs: Sequence[Pair], ratio: float = 0.1, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): a seeded shuffle with ``ratio`` of the pairs (at least one) held out."""
    if not 0 < ratio < 1:
        raise ConfigError(f"the held-out ratio must be between 0 and 1 (got {ratio}); e.g. --validation-ratio 0.1")
    if len(pairs) < 2:
        raise ConfigError(f"{len(pairs)} pair(s) cannot be split into train and held-out pairs; give more pairs "
                          "or a separate --validation-data file")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = min(len(pairs) - 1, max(1, round(len(pairs) * ratio)))
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


# ---- scoring ------------------------------------------------------------------------------------------


def _chunks(lengths: Sequence[int], batch_size: int) -> tuple[list[list[int]], torch.Tensor]:
    """Row indices in batches of similar lengths (less padding), and the permutation that restores the order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)], inverse


def _decoder_logps(bank: MultiTaskModel, features: Sequence[dict[str, Any]], slot: int) -> torch.Tensor:
    """Summed response log-probabilities of one batch on a causal LM.

    Rows are left-padded so that every response ends at the last position; the LM head then runs only on
    the last (longest response + 1) positions (``logits_to_keep``), not over the prompts: with a 49k
    vocabulary the logits of whole rows would be most of the memory.
    """
    pad = bank.base.tokenizer.pad_token_id
    batch = to_device(collate(features, pad, slot, padding_side="left"), bank.base.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scored = [min(sum(t != IGNORE for t in f["labels"]), len(f["input_ids"]) - 1) for f in features]
    keep = max(1, max(scored))
    if supports_logits_to_keep(bank.base.model):  # left padding: the bank's positions count real tokens only
        logits = bank.run(ids, mask, batch["task_ids"], logits_to_keep=keep + 1).out.logits
    else:
        logits = bank.run(ids, mask, batch["task_ids"]).out.logits[:, -(keep + 1):]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)  # (B, keep)
    positions = torch.arange(keep, device=ids.device)
    valid = positions[None, :] >= keep - torch.tensor(scored, device=ids.device)[:, None]
    return (token_logp * valid).sum(-1)


def _seq2seq_logps(bank: MultiTaskModel, features: Sequence[dict[str, Any]], slot: int) -> torch.Tensor:
    """Summed response log-probabilities of one batch on an encoder-decoder (the response is the target)."""
    pad = bank.base.tokenizer.pad_token_id
    batch = to_device(collate(features, pad, slot), bank.base.device)
    labels = batch["labels"]
    logits = bank.run(batch["input_ids"], batch["attention_mask"], batch["task_ids"], labels=labels,
                      decoder_length=labels.shape[1]).out.logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * (labels != IGNORE)).sum(-1)


def sequence_logps(bank: MultiTaskModel, task: str, prompts: Sequence[str], responses: Sequence[str],
                   max_length: int = 256, batch_size: int = 8, desc: str | None = None) -> torch.Tensor:
    """(N,) summed log-probability of each response given its prompt under generation task ``task``.

    Encoded as training encodes generation (:func:`multitune.encode.encode_task`: the chat template when
    the tokenizer has one, the response followed by EOS, the prompt cut from the left to fit
    ``max_length``). Differentiable; wrap in ``torch.no_grad()`` to score, in ``bank.disabled()`` for the
    reference model. ``desc``: show a progress bar over the batches with this title.
    """
    spec = bank.spec(task)
    if spec.kind != "generation":
        raise ConfigError(f"task '{task}' is a {spec.kind} task; response log-probabilities need a generation task")
    if bank.base.arch == "encoder":
        raise ConfigError(f"{bank.base.source} is an encoder and has no next-token probabilities; use a causal LM "
                          "such as smollm2-135m")
    if len(prompts) != len(responses):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    if not prompts:
        return torch.zeros(0, device=bank.base.device)
    examples = [Example(text=p, response=r) for p, r in zip(prompts, responses, strict=True)]
    features = encode_task(bank, task, examples, max_length, with_target=True)
    slot = bank.slots.index(task)
    score = _seq2seq_logps if bank.base.arch == "seq2seq" else _decoder_logps
    batches, inverse = _chunks([len(f["input_ids"]) + len(f["labels"]) for f in features], batch_size)
    with _autocast(bank):
        out = torch.cat([score(bank, [features[i] for i in rows], slot) for rows in _bar(batches, desc)])
    return out[inverse.to(out.device)]


def _bar(batches: list[list[int]], desc: str | None) -> Any:
    """The batches, with a progress bar on stderr when ``desc`` is given (long scoring passes)."""
    return tqdm(batches, desc=desc, leave=False, dynamic_ncols=True) if desc else batches


def _joined_ids(bank: MultiTaskModel, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids a reward model reads: the prompt as generation encodes it, then the response and EOS.

    The same tokens a policy produces, so a reward model scores PPO rollouts as it saw its training
    pairs. Too long: the prompt loses its beginning (down to half of ``max_length``), then the response
    its end.
    """
    tokenizer = bank.base.tokenizer
    head = prompt_ids(bank.base, prompt)
    tail = list(tokenizer(response, add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    if len(head) + len(tail) > max_length:
        kept_prompt = min(len(head), max(max_length - len(tail), max_length // 2))
        head = head[len(head) - kept_prompt:]
        tail = tail[: max_length - len(head)]
    return head + tail


def _check_reward_task(bank: MultiTaskModel, task: str) -> TaskSpec:
    spec = bank.spec(task)
    if spec.kind != "classification" or spec.labels != REWARD_LABELS:
        raise ConfigError(f"task '{task}' is not a reward model (a classification task with labels {REWARD_LABELS}); "
                          "add one with add_reward_task or train it with 'multitune reward'")
    return spec


def score_rows(bank: MultiTaskModel, task: str, prompts: Sequence[str], responses: Sequence[str],
               max_length: int = 256) -> torch.Tensor:
    """(N,) differentiable reward scores of one batch: logit[chosen] - logit[rejected] of reward task ``task``."""
    _check_reward_task(bank, task)
    features = [{"input_ids": _joined_ids(bank, p, r, max_length)} for p, r in zip(prompts, responses, strict=True)]
    batch = to_device(collate(features, bank.base.tokenizer.pad_token_id, bank.slots.index(task)), bank.base.device)
    with _autocast(bank):
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"]).float()
    return logits[:, 1] - logits[:, 0]


def reward_scores(bank: MultiTaskModel, task: str, prompts: Sequence[str], responses: Sequence[str],
                  max_length: int = 256, batch_size: int = 16, desc: str | None = None) -> torch.Tensor:
    """(N,) reward scores of (prompt, response) rows, without gradients (what PPO's reward reads)."""
    if len(prompts) != len(responses):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    _check_reward_task(bank, task)
    if not prompts:
        return torch.zeros(0)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]  # characters: a cheap proxy
    batches, inverse = _chunks(lengths, batch_size)
    with torch.no_grad():
        out = torch.cat([score_rows(bank, task, [prompts[i] for i in rows], [responses[i] for i in rows], max_length)
                         for rows in _bar(batches, desc)])
    return out[inverse.to(out.device)]


def add_reward_task(bank: MultiTaskModel, task: str = "reward", method: str = "lora", config: Any = None) -> TaskSpec:
    """Add a reward model: a classification task with labels ["rejected", "chosen"] (score = their logit gap)."""
    _check_trainable(method, head=True)
    return bank.add_task(task, "classification", method, config, list(REWARD_LABELS))


def _check_trainable(method: str, head: bool = False) -> None:
    """Methods with parameters to train; ``head``: a classification head counts (the base method's probe)."""
    spec_method = get_method(method)
    if spec_method.fit is not None or spec_method.score is not None or (method == "base" and not head):
        raise ConfigError(f"method '{method}' has no adapter to train here; choose one of: "
                          f"{', '.join(trainable_methods())}")


def trainable_methods() -> list[str]:
    """The methods DPO, PPO and a reward model can train: those with parameters (not prompting, not the
    bare base, whose only parameters would be a classification head)."""
    return [n for n, m in sorted(METHODS.items()) if m.fit is None and m.score is None and n != "base"]


def _accuracy(diff: torch.Tensor, tie: float = 0.0) -> float:
    """Fraction of pairs ranked right; ties count half, so that a model that cannot tell scores 0.5."""
    if diff.numel() == 0:
        return float("nan")
    right = (diff > tie).double() + 0.5 * (diff.abs() <= tie).double()
    return float(right.mean())


def _reward_eval(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], max_length: int,
                 batch_size: int, desc: str | None = None) -> dict[str, float]:
    prompts = [p.prompt for p in pairs]
    scores = reward_scores(bank, task, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                           max_length, batch_size, desc).float()
    diff = scores[: len(pairs)] - scores[len(pairs):]
    return {"accuracy": _accuracy(diff), "margin": float(diff.mean()), "loss": float(-F.logsigmoid(diff).mean())}


def pair_accuracy(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], max_length: int = 256,
                  batch_size: int = 16) -> float:
    """Fraction of pairs whose chosen response scores higher (ties count half).

    A reward task compares its scores; a generation task (a DPO policy) its implicit rewards
    ``log pi(y|x) - log ref(y|x)`` against the base with adapters off (the sign does not depend on beta).
    """
    if bank.spec(task).kind == "generation":
        return _dpo_eval(bank, task, pairs, _reference_logps(bank, task, pairs, max_length, batch_size), 1.0,
                         max_length, batch_size)["accuracy"]
    return _reward_eval(bank, task, pairs, max_length, batch_size)["accuracy"]


# ---- the shared loop ------------------------------------------------------------------------------------
def _check_train_config(config: TrainConfig) -> None:
    problems = [f"{name} must be >= 1 (got {getattr(config, name)})"
                for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_length", "patience")
                if getattr(config, name) < 1]
    if config.learning_rate is not None and config.learning_rate <= 0:
        problems.append(f"learning_rate must be > 0 (got {config.learning_rate})")
    if config.scheduler not in ("linear", "cosine", "constant"):
        problems.append(f"scheduler must be linear, cosine or constant (got '{config.scheduler}')")
    if problems:
        raise ConfigError("; ".join(problems))


def _optimise(bank: MultiTaskModel, task: str, n: int, batch_loss: Callable[[list[int]], tuple[torch.Tensor, dict]],
              evaluate_now: Callable[[], dict[str, float] | None], config: TrainConfig, progress: bool,
              desc: str, run_dir: str | Path | None = None, resume: bool = False,
              on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The one training loop (:func:`multitune.training.loop.fit`) over ``n`` training pairs, in eval mode.

    ``batch_loss(rows)`` gives the mean loss of those pairs and its statistics; ``evaluate_now()`` the
    held-out record (accuracy, margin, loss) or None without held-out pairs. The weights before the first
    step are a candidate too: training that only makes things worse returns the task unchanged. The best
    evaluation (accuracy, then lower loss) is restored at the end; a method that folds is scored again after.
    """
    _check_train_config(config)
    spec = bank.spec(task)
    if not bank.task_parameters(task):
        raise ConfigError(f"task '{task}' ({spec.method}) has no trainable parameters; choose one of: "
                          f"{', '.join(trainable_methods())}")
    if n < 1:
        raise ConfigError("no training pairs; give a file with at least one pair")
    lr = config.learning_rate or get_method(spec.method).default_learning_rate
    objective = Objective([task], [lr], Shuffled(n, config.batch_size, config.seed), batch_loss,
                          lambda _: evaluate_now(), {task: "accuracy"},
                          key=lambda _, scores: (scores["accuracy"], -scores["loss"]))
    result = fit(bank, objective, config, run_dir, resume, progress, desc, score_start=True, train_mode=False,
                 on_step=on_step)[task]
    evals = result.history
    after = next((e for e in evals if e["step"] == result.best_step), None)
    if get_method(spec.method).fold is not None:  # what is saved is the folded task: score it
        with torch.no_grad():
            scores = evaluate_now()
        if after is not None and scores is not None:
            after = {**after, **scores}
    return {"steps": result.steps, "best_step": result.best_step, "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 2), "learning_rate": lr, "history": result.log, "evals": evals,
            "before": evals[0] if evals else None, "after": after,
            "validation_accuracy": after["accuracy"] if after else None}


# ---- reward model -------------------------------------------------------------------------------------
def train_reward(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], validation_pairs: Sequence[Pair],
                 config: TrainConfig, progress: bool = True, run_dir: str | Path | None = None,
                 resume: bool = False, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train reward task ``task`` on Bradley-Terry ``-log sigmoid(s_chosen - s_rejected)``.

    ``config.batch_size`` counts pairs (each step reads 2 x batch_size sequences in one forward). Returns
    ``history`` (loss, margin, accuracy per step), ``evals`` (held-out pair accuracy, margin, loss per
    evaluation, the first before training), ``before``/``after`` and ``validation_accuracy`` (of the
    weights kept).
    """
    _check_reward_task(bank, task)
    _check_train_config(config)
    pairs, validation_pairs = list(pairs), list(validation_pairs)

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [pairs[i] for i in rows]
        prompts = [p.prompt for p in batch]
        scores = score_rows(bank, task, prompts + prompts, [p.chosen for p in batch] + [p.rejected for p in batch],
                            config.max_length)
        diff = scores[: len(batch)] - scores[len(batch):]
        loss = -F.logsigmoid(diff).mean()
        return loss, {"loss": float(loss.detach()), "margin": float(diff.detach().mean()), "accuracy": _accuracy(diff)}

    def evaluate_now() -> dict[str, float] | None:
        if not validation_pairs:
            return None
        return _reward_eval(bank, task, validation_pairs, config.max_length, config.eval_batch_size,
                            "held-out pairs" if progress else None)

    return _optimise(bank, task, len(pairs), batch_loss, evaluate_now, config, progress, f"reward {task}", run_dir,
                     resume, on_step)


# ---- DPO ----------------------------------------------------------------------------------------------
def _check_policy(bank: MultiTaskModel, task: str) -> TaskSpec:
    spec = bank.spec(task)
    if spec.kind != "generation":
        raise ConfigError(f"task '{task}' is a {spec.kind} task; DPO trains a generation task")
    if bank.base.arch == "encoder":
        raise ConfigError(f"DPO needs a causal LM or a seq2seq model; {bank.base.source} is an encoder. "
                          "Use a decoder such as smollm2-135m")
    return spec


def _reference_logps(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], max_length: int, batch_size: int,
                     reference: str = "disabled", desc: str | None = None) -> torch.Tensor:
    """(N, 2) log-probabilities of (chosen, rejected) under the reference, computed once, without gradients.

    ``disabled``: the base with every adapter off. ``initial`` (alias ``copy``): the task as it is now (a
    policy that starts from a fine-tuned adapter, the usual SFT-then-DPO recipe).
    """
    reference = reference_name(reference)
    prompts = [p.prompt for p in pairs]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with torch.no_grad(), bank.disabled() if reference == "disabled" else contextlib.nullcontext():
        logps = sequence_logps(bank, task, prompts + prompts, responses, max_length, batch_size, desc).float()
    return torch.stack([logps[: len(pairs)], logps[len(pairs):]], dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean sigmoid DPO loss, per-pair reward margins beta * ((pc - rc) - (pr - rr)))."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margins).mean(), margins


def _dpo_eval(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], reference: torch.Tensor, beta: float,
              max_length: int, batch_size: int, desc: str | None = None) -> dict[str, float]:
    prompts = [p.prompt for p in pairs]
    with torch.no_grad():
        logps = sequence_logps(bank, task, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                               max_length, batch_size, desc).float()
    ref = reference.to(logps.device)
    loss, margins = dpo_loss(logps[: len(pairs)], logps[len(pairs):], ref[:, 0], ref[:, 1], beta)
    return {"accuracy": _accuracy(margins, TIE * beta), "margin": float(margins.mean()), "loss": float(loss),
            "chosen_reward": float((beta * (logps[: len(pairs)] - ref[:, 0])).mean()),
            "rejected_reward": float((beta * (logps[len(pairs):] - ref[:, 1])).mean())}


def train_dpo(bank: MultiTaskModel, task: str, pairs: Sequence[Pair], validation_pairs: Sequence[Pair],
              config: TrainConfig, beta: float = 0.1, progress: bool = True,
              reference: str = "disabled", run_dir: str | Path | None = None, resume: bool = False,
              on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train generation task ``task`` with DPO's sigmoid loss against the reference (see the module doc).

    ``config.batch_size`` counts pairs. Returns ``history`` (loss, margin, reward accuracy per step),
    ``evals`` (held-out preference accuracy: the fraction of pairs whose implicit reward
    ``beta * (log pi - log ref)`` is higher for the chosen response, the mean margin, the loss), ``before``
    (at the start) and ``after`` (the weights kept). A task that owns the base weights (``full``) is its own
    reference at the start either way: the reference is computed before the first update.
    """
    if not beta > 0:
        raise ConfigError(f"beta must be > 0 (got {beta}); it scales the implicit reward, 0.1 is usual")
    reference = reference_name(reference)
    spec = _check_policy(bank, task)
    _check_train_config(config)
    if get_method(spec.method).fit is not None or not bank.task_parameters(task):
        raise ConfigError(f"method '{spec.method}' has no trainable parameters for DPO; choose one of: "
                          f"{', '.join(trainable_methods())}")
    if not pairs:
        raise ConfigError("no training pairs; give a file with at least one pair")
    pairs, validation_pairs = list(pairs), list(validation_pairs)
    bank.eval()
    ref_train = _reference_logps(bank, task, pairs, config.max_length, config.eval_batch_size, reference,
                                 "reference (train pairs)" if progress else None)
    ref_val = _reference_logps(bank, task, validation_pairs, config.max_length, config.eval_batch_size, reference,
                               "reference (held-out pairs)" if progress else None)

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [pairs[i] for i in rows]
        prompts = [p.prompt for p in batch]
        logps = sequence_logps(bank, task, prompts + prompts, [p.chosen for p in batch] + [p.rejected for p in batch],
                               config.max_length, 2 * len(batch))
        ref = ref_train[rows].to(logps.device)
        loss, margins = dpo_loss(logps[: len(batch)], logps[len(batch):], ref[:, 0], ref[:, 1], beta)
        return loss, {"loss": float(loss.detach()), "margin": float(margins.detach().mean()),
                      "accuracy": _accuracy(margins.detach(), TIE * beta)}

    def evaluate_now() -> dict[str, float] | None:
        if not validation_pairs:
            return None
        return _dpo_eval(bank, task, validation_pairs, ref_val, beta, config.max_length, config.eval_batch_size,
                         "held-out pairs" if progress else None)

    result = _optimise(bank, task, len(pairs), batch_loss, evaluate_now, config, progress, f"dpo {task}", run_dir,
                       resume, on_step)
    result.update(beta=beta, reference=reference)
    # how often the reference alone already gives the chosen response the higher likelihood (length-biased)
    result["reference_likelihood_accuracy"] = _accuracy(ref_val[:, 0] - ref_val[:, 1]) if validation_pairs else None
    return result


# ---- CLI ----------------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"


def _add_common_arguments(parser: argparse.ArgumentParser, output: str, methods: list[str]) -> None:
    from multitune.config import add_arguments, add_config_argument, add_method_arguments

    add_config_argument(parser)
    parser.add_argument("--data", dest="data.data", metavar="FILE",
                        help="preference pairs (.jsonl .json .csv .parquet): prompt/chosen/rejected columns, or HH "
                        "chosen/rejected dialogues split at the last '\\n\\nAssistant:'")
    parser.add_argument("--validation-data", dest="data.validation_data", metavar="FILE",
                        help="held-out pairs for early stopping and the reported accuracy "
                        "(default: --validation-ratio of --data)")
    parser.add_argument("--validation-ratio", type=float, default=0.1,
                        help="fraction of --data held out when no --validation-data is given (default: 0.1)")
    parser.add_argument("--split-seed", dest="data.split_seed", type=int, metavar="N",
                        help="seed of the held-out split (default: 0)")
    parser.add_argument("--max-pairs", dest="data.max_examples", type=int, metavar="N",
                        help="train on at most N pairs (after the held-out split)")
    parser.add_argument("--drop-empty", dest="data.drop_empty", action=argparse.BooleanOptionalAction, default=None,
                        help="drop pairs with an empty chosen or rejected response (default: off)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"base model: short name, HF folder or .gguf (default: {DEFAULT_MODEL})")
    parser.add_argument("--method", default="lora", help="adaptation method: " + ", ".join(methods)
                        + " (default: lora)")
    parser.add_argument("--task", help="task name: letters, digits, _ and - (default: the --output folder's name)")
    parser.add_argument("--output", default=output,
                        help=f"folder to write: config.yaml, metrics.jsonl, adapter/, result.json (default: {output})")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(parser, TrainConfig, dest_prefix="train.")
    add_method_arguments(parser, [m for m in methods if m in METHODS])


def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``multitune reward``: the data, the base and method (as ``multitune train``), training."""
    _add_common_arguments(parser, "runs/reward", ["base", *trainable_methods()])


def add_dpo_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``multitune dpo``: those of ``reward``, plus beta, the reference and a starting adapter."""
    _add_common_arguments(parser, "runs/dpo", trainable_methods())
    parser.add_argument("--beta", type=float, default=0.1,
                        help="DPO's beta: how far the policy may move from the reference (default: 0.1)")
    parser.add_argument("--reference", choices=[*REFERENCES, *REFERENCE_ALIASES], default="disabled",
                        help=f"{REFERENCE_HELP} (default: disabled)")
    parser.add_argument("--init-adapter", metavar="DIR",
                        help="start from this trained generation adapter (e.g. an SFT run's RUN/adapter) "
                        "instead of a fresh task")


def _run_config(args: argparse.Namespace) -> Any:
    """The flags (defaults < --config file < flags) as a RunConfig, validated as ``multitune train``'s are."""
    from multitune.config import load_run_config

    config = load_run_config(args)
    if not 0 < args.validation_ratio < 1:
        raise ConfigError(f"--validation-ratio must be between 0 and 1 (got {args.validation_ratio})")
    if not config.data.data:
        raise ConfigError("no preference data given; pass --data FILE (.jsonl .json .csv .parquet with "
                          "prompt/chosen/rejected or HH chosen/rejected)")
    return config


@contextlib.contextmanager
def run_folder(output: str | Path, command: str, resume: bool = False) -> Any:
    """Hold the output folder for the block (one command at a time); refuse one that is not this command's.

    Yields ``start(settings)``, to call once the data, the model and the task are ready: it writes config.yaml
    (the training loop writes metrics.jsonl and the checkpoint). With ``resume``, an interrupted run of the same
    command in the folder continues from its checkpoint; without it, only an empty folder is taken. A run
    refused before ``start`` leaves nothing.
    """
    from multitune.storage import output_lock

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; choose another --output")
    with output_lock(out, command):
        ours = _is_run_of(out, command)
        if resume and any(out.iterdir()) and not ours:
            raise ConfigError(f"--resume continues a run of '{command}', and {out} holds none; choose another "
                              "--output")
        if not resume and any(out.iterdir()):
            hint = "pass --resume to continue it, or" if ours else ""
            raise ConfigError(f"output folder {out} already exists; {hint} choose another --output or remove it")

        def start(settings: str) -> Callable[[dict[str, Any]], None]:
            """Write config.yaml; returns ``append(record)``, which adds a line to metrics.jsonl (PPO's steps;
            the training loop of reward and DPO writes its own lines there)."""
            import json

            (out / "config.yaml").write_text(_RUN_MARK.format(command=command) + settings)
            metrics = out / "metrics.jsonl"
            if not metrics.exists():
                metrics.write_text("")

            def append(record: dict[str, Any]) -> None:
                with open(metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")

            return append

        yield start


_RUN_MARK = "# {command} run folder: the settings of this run (--config reads them back)\n"


def _is_run_of(folder: Path, command: str) -> bool:
    try:
        return (folder / "config.yaml").read_text().startswith(_RUN_MARK.format(command=command))
    except OSError:
        return False


def _finished(folder: Path) -> dict[str, Any] | None:
    """The result of a run that already finished in ``folder`` (resuming it changes nothing)."""
    import json

    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _load_splits(config: Any, ratio: float) -> tuple[list[Pair], list[Pair]]:
    data = config.data
    pairs = load_pairs(data.data, drop_empty=bool(data.drop_empty))
    if data.validation_data:
        train, held = pairs, load_pairs(data.validation_data, drop_empty=bool(data.drop_empty))
    else:
        train, held = split_pairs(pairs, ratio, data.split_seed)
    if data.max_examples is not None:
        if data.max_examples < 1:
            raise ConfigError(f"--max-pairs must be >= 1 (got {data.max_examples})")
        train = train[: data.max_examples]
    return train, held


def _load_bank(config: Any) -> MultiTaskModel:
    from multitune.models import load_base

    device = None if config.train.device == "auto" else config.train.device
    torch.manual_seed(config.train.seed)
    return MultiTaskModel(load_base(config.model, device=device))


def _settings(config: Any) -> dict[str, Any]:
    return {"train": dataclasses.asdict(config.train), config.method: dataclasses.asdict(config.method_config())}


def _settings_yaml(args: argparse.Namespace, config: Any) -> str:
    """config.yaml: this command's settings as resolved, in the layout its ``--config`` reads back."""
    from multitune.config import command_yaml, run_config_values

    return command_yaml(args, run_config_values(config))


def _save(bank: MultiTaskModel, task: str, out: Path, summary: dict[str, Any], keep_checkpoint: bool,
          extra: dict[str, Any]) -> None:
    """The adapter (an atomic folder swap), then result.json: a run with a result.json is complete; its
    checkpoint goes unless ``keep_checkpoint``."""
    import shutil

    from multitune.storage import save_adapter, write_json_atomic
    from multitune.training.loop import CHECKPOINT

    save_adapter(bank, task, out / "adapter", extra=extra)
    write_json_atomic(out / "result.json", summary)
    if not keep_checkpoint:
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_kept(result: dict[str, Any]) -> None:
    """Say so when early stopping kept weights other than the last ones (the start, possibly)."""
    last = result["evals"][-1] if result["evals"] else None
    if last is None or result["best_step"] == result["steps"]:
        return
    where = "its starting weights" if result["best_step"] == 0 else f"the weights of step {result['best_step']}"
    print(f"kept {where}: the held-out pairs scored best there (the last evaluation, step {last['step']}: "
          f"accuracy {_fmt(last['accuracy'])}, margin {_fmt(last['margin'])})")


def cmd_reward(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune reward``: train a reward model on preference pairs; write config.yaml, metrics.jsonl,
    DIR/adapter and DIR/result.json."""
    config = _run_config(args)
    _check_trainable(config.method, head=True)
    with run_folder(config.output, "multitune reward", args.resume) as start:
        done = _finished(Path(config.output)) if args.resume else None
        if done is not None:
            print(f"reward model '{done['task']}' finished in an earlier run; adapter: {Path(config.output) / 'adapter'}")
            return done
        train, held = _load_splits(config, args.validation_ratio)  # the user's files first: they fail fast
        bank = _load_bank(config)
        add_reward_task(bank, config.task, config.method, config.method_config())
        trainable = sum(p.numel() for p in bank.task_parameters(config.task).values())
        start(_settings_yaml(args, config))
        result = train_reward(bank, config.task, train, held, config.train, progress=not args.quiet,
                              run_dir=config.output, resume=args.resume)
        before, after = result["before"] or {}, result["after"] or {}
        summary = {
            "command": "reward", "task": config.task, "method": config.method, "model": config.model,
            "pairs": {"train": len(train), "validation": len(held)}, "trainable_parameters": trainable,
            "steps": result["steps"], "best_step": result["best_step"], "stopped_early": result["stopped_early"],
            "seconds": result["seconds"], "learning_rate": result["learning_rate"],
            "validation_pair_accuracy": result["validation_accuracy"], "validation_margin": after.get("margin"),
            "validation_loss": after.get("loss"), "before": before, "evals": result["evals"],
            "score": "logit[chosen] - logit[rejected]", "settings": _settings(config),
        }
        out = Path(config.output)
        _save(bank, config.task, out, summary, config.train.keep_checkpoint,
              {"reward_model": {"labels": REWARD_LABELS, "score": summary["score"]},
                                                "metrics": {"validation_pair_accuracy": result["validation_accuracy"]}})
    print(f"trained reward model '{config.task}' ({config.method}) on {config.model}: {trainable:,} trainable "
          f"parameters, {plural(len(train), 'pair')}, {plural(result['steps'], 'step')}, {result['seconds']:.1f} s")
    print(f"held-out pair accuracy: {_fmt(result['validation_accuracy'])} (before training "
          f"{_fmt(before.get('accuracy'))}) on {plural(len(held), 'pair')}")
    _print_kept(result)
    print(f"adapter: {out / 'adapter'}")
    return summary


def cmd_dpo(args: argparse.Namespace) -> dict[str, Any]:
    """``multitune dpo``: DPO on preference pairs; write config.yaml, metrics.jsonl, DIR/adapter and
    DIR/result.json."""
    if not args.beta > 0:
        raise ConfigError(f"--beta must be > 0 (got {args.beta}); 0.1 is usual")
    reference = reference_name(args.reference)
    config = _run_config(args)
    if not args.init_adapter:
        _check_trainable(config.method)
    with run_folder(config.output, "multitune dpo", args.resume) as start:
        done = _finished(Path(config.output)) if args.resume else None
        if done is not None:
            print(f"policy '{done['task']}' finished in an earlier run; adapter: {Path(config.output) / 'adapter'}")
            return done
        train, held = _load_splits(config, args.validation_ratio)
        bank = _load_bank(config)
        if args.init_adapter:
            from multitune.api import adapter_folder
            from multitune.storage import load_adapter

            spec = load_adapter(bank, adapter_folder(args.init_adapter), config.task)
            if spec.kind != "generation":
                raise ConfigError(f"{args.init_adapter} holds a {spec.kind} task; DPO starts from a generation "
                                  "adapter")
        else:
            bank.add_task(config.task, "generation", config.method, config.method_config())
        method = bank.tasks[config.task].method
        trainable = sum(p.numel() for p in bank.task_parameters(config.task).values())
        _check_policy(bank, config.task)
        start(_settings_yaml(args, config))
        result = train_dpo(bank, config.task, train, held, config.train, beta=args.beta, progress=not args.quiet,
                           reference=reference, run_dir=config.output, resume=args.resume)
        before, after = result["before"] or {}, result["after"] or {}
        summary = {
            "command": "dpo", "task": config.task, "method": method, "model": config.model, "beta": args.beta,
            "reference": reference, "init_adapter": args.init_adapter,
            "pairs": {"train": len(train), "validation": len(held)}, "trainable_parameters": trainable,
            "steps": result["steps"], "best_step": result["best_step"], "stopped_early": result["stopped_early"],
            "seconds": result["seconds"], "learning_rate": result["learning_rate"],
            "preference_accuracy": {"before": before.get("accuracy"), "after": after.get("accuracy")},
            "margin": {"before": before.get("margin"), "after": after.get("margin")},
            "reference_likelihood_accuracy": result["reference_likelihood_accuracy"],
            "validation_loss": {"before": before.get("loss"), "after": after.get("loss")},
            "evals": result["evals"], "settings": _settings(config),
        }
        out = Path(config.output)
        _save(bank, config.task, out, summary, config.train.keep_checkpoint,
              {"dpo": {"beta": args.beta, "reference": reference},
                                                "metrics": {"preference_accuracy": summary["preference_accuracy"]}})
    print(f"trained '{config.task}' ({method}) with DPO (beta {args.beta}) on {config.model}: {trainable:,} "
          f"trainable parameters, {plural(len(train), 'pair')}, {plural(result['steps'], 'step')}, "
          f"{result['seconds']:.1f} s")
    print(f"held-out preference accuracy: {_fmt(before.get('accuracy'))} -> {_fmt(after.get('accuracy'))}, "
          f"mean margin {_fmt(before.get('margin'))} -> {_fmt(after.get('margin'))} on {plural(len(held), 'pair')}")
    _print_kept(result)
    print(f"adapter: {out / 'adapter'}")
    return summary
