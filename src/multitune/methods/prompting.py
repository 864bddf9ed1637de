"""Prompt design: a hand-written template with k solved examples before the input; nothing is trained.

The "prompt design" baseline of Lester et al. (2021, figure 1), in the few-shot style of GPT-3 (Brown et
al. 2020, section 2): the model reads an instruction, k shots (the template filled with a training example
and its answer) and the query (the template up to the answer slot, filled with the input), as plain text or,
on instruct decoders, as the turns of a conversation through the tokenizer's chat template. How the text is
put together, and cut to the token budget, is :mod:`multitune.methods.prompt_render`.

Classification, decoders and T5: label c is scored by the log-likelihood of its verbaliser's tokens v_c
after the rendered prompt x, summed over the tokens (not length-normalised)::

    s_c(x) = sum_{t=1..|v_c|} log p(v_c,t | x, v_c,<t)            logits (B, C) = s (B, C)

so softmax(s) is p(c | x, the answer is one of the verbalisers), and accuracy, macro-F1 and the loss
work as for a head. A sum is the probability of the exact answer string; a mean would favour verbalisers
whose later tokens are predictable from their first. Cost: one forward of the prompts (only the last
position's logits); when a verbaliser has more than one token, one more forward of the remaining tokens
of every label over the prompts' KV cache repeated per label (T5: the encoder output repeated, the
decoder reading ``[start, v_c,<T]``). No generated text is parsed.

Calibration (``calibrate``): the logits become s_c(x) - log p_bias(c), with p_bias the mean label
distribution of content-free inputs in the same prompt (Zhao et al. 2021) or of the shot pool's examples
(``calibrate_with pool``; :func:`label_prior`), so a prompt's bias towards a label whatever the input is
divided out.

Classification, encoders (no LM head): the counterpart of a verbaliser's likelihood is the cosine
between the input's mean-pooled embedding e(x) and a prototype per label::

    proto_c(x) = mean({u(e(v_c))} + {u(e(s)) : s in shots(x), label(s) = c}),   u(v) = v / |v|
    logits_c   = cos(e(x), proto_c(x)) / temperature

zero-shot: the verbaliser's embedding alone. Templates are not used on encoders (they read the input).

Shots are k examples of the pool: ``random`` (seeded by ``seed`` and the input, so an input always gets
the same shots) or ``similar`` (the k nearest by cosine of the base model's mean-pooled last hidden
states, T5: its encoder's, every adapter off; the nearest is placed last, next to the query). An input
never gets itself (the same tokens) as a shot.

``fit`` (what training means here) keeps a label-balanced pool of ``pool_size`` training examples in the
task's config, so adapter.json holds it and the adapter has no tensors. Pool embeddings and the content-free
prior are computed on first use and cached per bank and task (after loading an adapter, on first use again).
"""

from __future__ import annotations

import hashlib
import json
import random
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from multitune.data import Example
from multitune.errors import ConfigError
from multitune.methods import Method, register
from multitune.methods.label_scores import (
    EMBED_MAX_LENGTH,
    decoder_label_scores,
    embed_ids,
    example_ids,
    mean_hidden,
    select_shots,
    seq2seq_label_scores,
    unit,
)
from multitune.methods.prompt_render import (
    CHAT_MODES,
    answer_space,
    kind_problems,
    render_one,
    template_problems,
)

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel, TaskSpec

SELECTIONS = ("random", "similar")
CONTENT_FREE = ("N/A", "", "[MASK]")  # the content-free inputs of Zhao et al. (2021)
CALIBRATION_SOURCES = ("content-free", "pool")
PRIOR_BATCH = 16  # prompts per forward while computing the label prior
UNSEEN_MAX_LENGTH = 128  # the budget of a task no prompt was rendered for yet (train and predict default)


@dataclass
class ShotPool:
    """The training examples shots are drawn from, as dicts of :class:`Example` fields (written by fit)."""

    examples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class PromptingConfig:
    template: str | None = field(
        default=None,
        metadata={
            "help": "one example as the model reads it: {text} (or {input}), {text_pair}, then {label} "
            "(classification) or {response} (generation); '\\n' is a newline; default "
            "'{text}\\nAnswer: {label}' (chat: 'Text: {text}\\nAnswer: {label}') or '{text}\\n{response}'"
        },
    )
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "text before the shots and the input; {labels} lists the verbalisers (default: "
            "'Answer with one of: {labels}.' for classification, chat: 'Classify the text into one of these "
            "categories: {labels}. Answer with the category only.', none for generation)"
        },
    )
    chat: str = field(
        default="auto",
        metadata={
            "help": "classification on a decoder: render the prompt through the tokenizer's chat template "
            "(instruction and input as the user's turn, shots as earlier turns, the label scored as the "
            "assistant's answer): auto (when the tokenizer has a chat template: instruct models), on, off"
        },
    )
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "classification: divide each label's probability by the prompt's bias towards it "
            "(contextual calibration, Zhao et al. 2021), the label distribution the same prompt gives inputs "
            "of --prompting-calibrate-with"
        },
    )
    calibrate_with: str = field(
        default="pool",
        metadata={
            "help": "the inputs whose mean label distribution calibration divides out: pool (the label-balanced "
            "shot pool, each with its own shots; content-free when the task has no pool) or content-free "
            "('N/A', '', '[MASK]')"
        },
    )
    verbalizers: str | dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "the answer word(s) of each label, label=words pairs, comma-separated, e.g. "
            "'positive=great,negative=terrible' (default: each label's own text)"
        },
    )
    shots: int = field(
        default=0, metadata={"help": "k solved training examples before the input (0: zero-shot)"}
    )
    selection: str = field(
        default="random",
        metadata={
            "help": "how shots are chosen: random (seeded per input) or similar (nearest by base-model embedding)"
        },
    )
    shot_separator: str = field(
        default="\n\n",
        metadata={"help": "text between the instruction, the shots and the input ('\\n' is a newline)"},
    )
    pool_size: int = field(
        default=64, metadata={"help": "training examples kept (label-balanced) to draw shots from"}
    )
    temperature: float = field(
        default=0.05, metadata={"help": "encoders: logits are cosine similarities / temperature"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the pool and of random shots"})
    pool: ShotPool = field(default_factory=ShotPool)  # written by fit; a dataclass, so never a CLI flag

    def __post_init__(self) -> None:
        if isinstance(self.pool, dict):  # read back from adapter.json or YAML
            self.pool = ShotPool(**self.pool)
        for name in ("template", "instruction", "shot_separator"):
            value = getattr(self, name)
            if isinstance(value, str):  # so that a shell argument can hold newlines
                setattr(self, name, value.replace("\\n", "\n").replace("\\t", "\t"))
        if isinstance(self.verbalizers, str):
            self.verbalizers = (
                _parse_pairs(self.verbalizers) or self.verbalizers
            )  # validate() reports a bad one
        elif isinstance(self.verbalizers, dict):
            self.verbalizers = {str(k): str(v) for k, v in self.verbalizers.items()}

    def validate(self) -> list[str]:
        problems = template_problems(self.template, self.instruction)
        if isinstance(self.verbalizers, str):
            problems.append(
                f"prompting verbalizers must be label=words pairs separated by commas, e.g. "
                f"'positive=great,negative=terrible' (got {self.verbalizers!r}): fix --prompting-verbalizers"
            )
        elif self.verbalizers:
            empty = sorted(k for k, v in self.verbalizers.items() if not v.strip())
            if empty:
                problems.append(
                    f"prompting verbalizers of {empty[:5]} are empty: give each label its answer words "
                    "with --prompting-verbalizers"
                )
        if self.shots < 0:
            problems.append(f"prompting shots must be >= 0 (got {self.shots}): fix --prompting-shots")
        if self.selection not in SELECTIONS:
            problems.append(
                f"prompting selection must be one of {', '.join(SELECTIONS)} (got '{self.selection}'): "
                "fix --prompting-selection"
            )
        if self.chat not in CHAT_MODES:
            problems.append(
                f"prompting chat must be one of {', '.join(CHAT_MODES)} (got {self.chat!r}): fix --prompting-chat"
            )
        if not isinstance(self.calibrate, bool):
            problems.append(
                f"prompting calibrate must be true or false (got {self.calibrate!r}): use "
                "--prompting-calibrate or --no-prompting-calibrate"
            )
        if self.calibrate_with not in CALIBRATION_SOURCES:
            problems.append(
                f"prompting calibrate_with must be one of {', '.join(CALIBRATION_SOURCES)} (got "
                f"{self.calibrate_with!r}): fix --prompting-calibrate-with"
            )
        if self.pool_size < 1:
            problems.append(
                f"prompting pool_size must be >= 1 (got {self.pool_size}): fix --prompting-pool-size"
            )
        elif self.pool_size < self.shots:
            problems.append(
                f"prompting pool_size {self.pool_size} is smaller than shots {self.shots}: raise "
                "--prompting-pool-size or lower --prompting-shots"
            )
        if not self.temperature > 0:
            problems.append(
                f"prompting temperature must be > 0 (got {self.temperature}): fix --prompting-temperature"
            )
        return problems


def _parse_pairs(text: str) -> dict[str, str] | None:
    """'a=x,b=y z' -> {'a': 'x', 'b': 'y z'}; None when malformed."""
    pairs = [part for part in text.split(",") if part.strip()]
    if not pairs or any("=" not in part for part in pairs):
        return None
    return {k.strip(): v.strip() for k, v in (part.split("=", 1) for part in pairs)}


# ---- the task's settings -----------------------------------------------------------------------------
def task_config(bank: MultiTaskModel, task: str) -> PromptingConfig:
    """The task's config, pool included, from its spec (the one place fit writes and adapters store)."""
    return PromptingConfig(**bank.tasks[task].config)


def verbalizers(config: PromptingConfig, spec: TaskSpec) -> dict[str, str]:
    """Label -> answer words, in the task's label order."""
    given = config.verbalizers if isinstance(config.verbalizers, dict) else {}
    return {label: given.get(label, label) for label in spec.labels}


def pool_examples(config: PromptingConfig) -> list[Example]:
    return [Example(**d) for d in config.pool.examples]


def continuation_ids(bank: MultiTaskModel, spec: TaskSpec, config: PromptingConfig) -> list[list[int]]:
    """Token ids of each label's answer after the prompt, in label order.

    Decoders: the whitespace that ends the template before ``{label}`` is moved in front of the
    verbaliser (BPE vocabularies spell " great" as one token), none in chat (the answer opens the
    assistant's turn); T5: the verbaliser is the decoder target.
    """
    tokenizer = bank.base.tokenizer
    words = list(verbalizers(config, spec).values())
    if bank.base.arch == "seq2seq":
        return [list(tokenizer(w, add_special_tokens=False).input_ids) for w in words]
    space = answer_space(bank.base, config, spec.kind)
    return [list(tokenizer(space + w, add_special_tokens=False).input_ids) for w in words]


# ---- attach / detach / fit -----------------------------------------------------------------------------
def attach(bank: MultiTaskModel, task: str, config: PromptingConfig) -> None:
    """Check the settings against the task; a prompting task has no parameters."""
    spec = bank.tasks[task]
    problems = kind_problems(bank.base, config, spec.kind)
    if spec.kind == "classification":
        given = config.verbalizers if isinstance(config.verbalizers, dict) else {}
        unknown = sorted(set(given) - set(spec.labels))
        if unknown:
            problems.append(
                f"--prompting-verbalizers names label(s) {unknown[:5]} that task '{task}' does not have; "
                f"its labels: {spec.labels[:10]}"
            )
        words = verbalizers(config, spec)
        seen: dict[str, str] = {}
        for label, word in words.items():
            if word in seen:
                problems.append(
                    f"labels {seen[word]!r} and {label!r} share the verbaliser {word!r}, so they would "
                    "always score the same: give each its own with --prompting-verbalizers"
                )
            seen.setdefault(word, label)
        if bank.base.arch != "encoder" and not unknown:
            empty = [
                w
                for w, ids in zip(words.values(), continuation_ids(bank, spec, config), strict=True)
                if not ids
            ]
            if empty:
                problems.append(
                    f"verbaliser(s) {empty[:5]} have no tokens in this model's vocabulary: "
                    "fix --prompting-verbalizers"
                )
    if problems:
        raise ConfigError("; ".join(problems))


def detach(bank: MultiTaskModel, task: str) -> None:
    _forget(bank, task)


def fit(bank: MultiTaskModel, task: str, examples: Sequence[Example]) -> None:
    """Keep up to ``pool_size`` training examples as the shot pool: labels in turn (balanced), seeded."""
    spec = bank.tasks[task]
    config = task_config(bank, task)
    rng = random.Random(config.seed)
    if spec.kind == "classification":
        groups = [[ex for ex in examples if ex.label == label] for label in spec.labels]
        for group in groups:
            rng.shuffle(group)
        pool = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
        pool = pool[: config.pool_size]
    else:
        usable = [ex for ex in examples if ex.response is not None]
        pool = rng.sample(usable, min(len(usable), config.pool_size))
    if config.shots and not pool:
        raise ConfigError(
            f"task '{task}' has no usable training examples to draw {config.shots} shots from; "
            "give labelled training data or use --prompting-shots 0"
        )
    spec.config["pool"] = {"examples": [{k: v for k, v in vars(ex).items() if v is not None} for ex in pool]}
    _forget(bank, task)


# ---- rendering -----------------------------------------------------------------------------------------
def render(bank: MultiTaskModel, task: str, examples: Sequence[Example], max_length: int) -> list[Example]:
    """The text the model reads for each example: instruction, shots and the input, within ``max_length`` tokens
    (plain or through the chat template: :mod:`multitune.methods.prompt_render`).

    The result's ``text`` is the whole prompt (``text_pair`` folded in), ``label`` and ``response`` are kept.
    """
    spec = bank.tasks[task]
    if spec.kind == "classification" and bank.base.arch == "encoder":
        return list(examples)  # an encoder reads the input itself; its shots enter the label prototypes
    config = task_config(bank, task)
    _cached(bank, task, config)["max_length"] = max_length  # the label prior's prompts get the same budget
    pool = pool_examples(config)
    chosen = choose_shots(bank, task, config, examples)
    words = verbalizers(config, spec) if spec.kind == "classification" else {}
    return [
        render_one(bank, spec, config, words, ex, [pool[i] for i in idx], max_length)
        for ex, idx in zip(examples, chosen, strict=True)
    ]


# ---- shots -----------------------------------------------------------------------------------------------
def choose_shots(
    bank: MultiTaskModel, task: str, config: PromptingConfig, examples: Sequence[Example]
) -> list[list[int]]:
    """Pool indices of each example's shots, in prompt order (for ``similar``, the nearest last)."""
    if min(config.shots, len(config.pool.examples)) == 0:
        return [[] for _ in examples]
    rows = [example_ids(bank, ex, EMBED_MAX_LENGTH) for ex in examples]
    queries = embed_ids(bank, rows) if config.selection == "similar" else None
    return pick_shots(bank, task, config, [tuple(r) for r in rows], queries)


def pick_shots(
    bank: MultiTaskModel,
    task: str,
    config: PromptingConfig,
    keys: list[tuple[int, ...]],
    queries: torch.Tensor | None,
) -> list[list[int]]:
    """k pool indices per input, inputs given by their token ids (and embeddings (n, d) for ``similar``).

    A pool example with the input's very tokens is never its shot; random draws are seeded by the seed
    and the tokens, so an input gets the same shots in any batch.
    """
    pool_keys = _pool_keys(bank, task, config)
    k = min(config.shots, len(pool_keys))
    if k == 0:
        return [[] for _ in keys]
    excluded = torch.tensor([[pk == q for pk in pool_keys] for q in keys], dtype=torch.bool)
    seeds = [f"{config.seed}\0" + ",".join(map(str, q)) for q in keys]
    sims = None
    if config.selection == "similar" and queries is not None:
        sims = unit(queries) @ unit(pool_embeddings(bank, task, config)).to(queries.device).T
    return select_shots(k, excluded, seeds, sims)


# ---- embeddings (similar shots, encoder prototypes) ------------------------------------------------------
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _forget(bank: MultiTaskModel, task: str) -> None:
    _CACHE.get(bank, {}).pop(task, None)


def _cached(bank: MultiTaskModel, task: str, config: PromptingConfig) -> dict[str, Any]:
    """The task's cache entry, emptied when its pool, labels or verbalisers changed."""
    spec = bank.tasks[task]
    key = hashlib.sha1(
        json.dumps([config.pool.examples, verbalizers(config, spec), spec.labels]).encode()
    ).hexdigest()
    entries = _CACHE.setdefault(bank, {})
    if task not in entries or entries[task]["key"] != key:
        entries[task] = {"key": key}
    return entries[task]


def _pool_keys(bank: MultiTaskModel, task: str, config: PromptingConfig) -> list[tuple[int, ...]]:
    """The pool examples' token ids (what identifies an input), cached on the task."""
    entry = _cached(bank, task, config)
    if "pool_keys" not in entry:
        entry["pool_keys"] = [tuple(example_ids(bank, ex, EMBED_MAX_LENGTH)) for ex in pool_examples(config)]
    return entry["pool_keys"]


def pool_embeddings(bank: MultiTaskModel, task: str, config: PromptingConfig) -> torch.Tensor:
    """(P, d) embeddings of the shot pool: computed once, then cached on the task."""
    entry = _cached(bank, task, config)
    if "pool" not in entry:
        entry["pool"] = embed_ids(bank, [list(key) for key in _pool_keys(bank, task, config)])
    return entry["pool"]


# ---- scoring -----------------------------------------------------------------------------------------------
def score(
    bank: MultiTaskModel, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Label logits (B, C) of rendered prompts: verbaliser log-likelihoods, or scaled cosines on encoders;
    with ``calibrate``, less the log label prior (:func:`label_prior`)."""
    config = task_config(bank, task)
    logits = raw_scores(bank, task, config, input_ids, attention_mask)
    if config.calibrate:
        logits = logits.float() - label_prior(bank, task, config).to(logits.device)
    return logits


def raw_scores(
    bank: MultiTaskModel,
    task: str,
    config: PromptingConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The uncalibrated label logits (B, C)."""
    spec = bank.tasks[task]
    with torch.no_grad(), bank.disabled():
        if bank.base.arch == "encoder":
            return prototype_scores(bank, task, config, input_ids, attention_mask)
        continuations = continuation_ids(bank, spec, config)
        if bank.base.arch == "seq2seq":
            return seq2seq_label_scores(bank.base.model, input_ids, attention_mask, continuations)
        return decoder_label_scores(bank.base.model, input_ids, attention_mask, continuations)


def label_prior(bank: MultiTaskModel, task: str, config: PromptingConfig) -> torch.Tensor:
    """log p_bias (C,): the label distribution the prompt gives whatever the input, what calibration divides out.

    Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): the template, the shots
    and their order bias a model towards some labels whatever the input; ``content-free`` inputs 'N/A', ''
    and '[MASK]' are rendered as any input is (the same template, instruction, chat turns, choice of shots and
    token budget), their label probabilities are averaged, and each input's are divided by them::

        q(c | x) = softmax_c(s_c(x) - log p_bias(c)),    p_bias = mean_{x' in X} softmax(s(x'))

    i.e. W = diag(p_bias)^-1, b = 0 on the probabilities. ``pool`` (the default) takes X = the shot pool's
    examples instead (each rendered with its own shots, never itself), the mean prediction over real inputs of
    the task as in Batch Calibration (Zhou et al. 2024): the pool is label-balanced, so a model
    without bias has a uniform mean there and is left unchanged; the content-free inputs hurt where they are
    unlike the task's (Gemma 3 270M, TREC: 0.457 raw, 0.343 content-free, 0.453 pool on 300 held-out
    questions). A task without a pool (nothing fitted) falls back to the content-free inputs. Computed once
    per task and settings (cached like the pool embeddings), in log space so that a label the prompt all but
    rules out is not divided by zero. A pair task (a template with {text_pair}, or a pool of pairs) gets
    content-free pairs.
    """
    from multitune.encode import collate, encode_task

    entry = _cached(bank, task, config)
    max_length = entry.get("max_length", UNSEEN_MAX_LENGTH)
    key = json.dumps([asdict(config), max_length], sort_keys=True, default=str)
    if entry.get("prior_key") != key:
        examples = [Example(text=ex.text, text_pair=ex.text_pair) for ex in pool_examples(config)]
        if config.calibrate_with == "content-free" or not examples:  # no pool: what is left to ask
            pair = "{text_pair}" in (config.template or "") or any(
                "text_pair" in ex for ex in config.pool.examples
            )
            examples = [Example(text=t, text_pair=t if pair else None) for t in CONTENT_FREE]
        device, logp = bank.base.device, []
        for start in range(0, len(examples), PRIOR_BATCH):
            features = encode_task(bank, task, examples[start : start + PRIOR_BATCH], max_length)
            batch = collate(features, bank.base.tokenizer.pad_token_id, bank.slots.index(task))
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logp.append(torch.log_softmax(raw_scores(bank, task, config, ids, mask).float(), dim=-1))
        log_mean = torch.logsumexp(torch.cat(logp), dim=0) - torch.log(torch.tensor(float(len(examples))))
        entry.update(prior=log_mean, prior_key=key)
    return entry["prior"]


def prototype_scores(
    bank: MultiTaskModel,
    task: str,
    config: PromptingConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Encoders: cos(e(x), proto_c(x)) / temperature (B, C); see the module docstring."""
    spec = bank.tasks[task]
    x = unit(mean_hidden(bank, input_ids, attention_mask))  # (B, d)
    entry = _cached(bank, task, config)
    if "verbalizers" not in entry:
        tokenizer = bank.base.tokenizer
        words = verbalizers(config, spec).values()
        entry["verbalizers"] = embed_ids(
            bank, [list(tokenizer(w, truncation=True, max_length=EMBED_MAX_LENGTH).input_ids) for w in words]
        )
    batch, labels = x.shape[0], len(spec.labels)
    total = unit(entry["verbalizers"]).to(x.device).unsqueeze(0).repeat(batch, 1, 1)  # (B, C, d)
    counts = torch.ones(batch, labels, device=x.device)
    pool = pool_examples(config)
    k = min(config.shots, len(pool))
    if k:
        pool_emb = unit(pool_embeddings(bank, task, config)).to(x.device)  # (P, d)
        rows = [
            tuple(r[m.bool()].tolist()) for r, m in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        chosen = pick_shots(bank, task, config, rows, x)
        picked = torch.zeros(
            batch, len(pool), device=x.device
        )  # (B, P): 1 where pool example p is a shot of row b
        for b, idx in enumerate(chosen):
            picked[b, idx] = 1.0
        onehot = (
            F.one_hot(
                torch.tensor([spec.labels.index(p.label) if p.label in spec.labels else 0 for p in pool]),
                labels,
            )
            .float()
            .to(x.device)
        )
        onehot[[i for i, p in enumerate(pool) if p.label not in spec.labels]] = 0.0
        total = total + torch.einsum("bp,pc,pd->bcd", picked, onehot, pool_emb)
        counts = counts + picked @ onehot
    prototypes = total / counts.unsqueeze(-1)
    return F.cosine_similarity(x.unsqueeze(1), prototypes, dim=-1) / config.temperature


def search(trial: Any) -> dict[str, Any]:
    """compare's prompting settings (nothing is trained): the number of shots, then how they are chosen,
    and whether the label prior of content-free inputs is divided out (it helps some prompts, hurts others)."""
    shots = trial.suggest_categorical("prompting.shots", [0, 2, 4, 8])
    params: dict[str, Any] = {"prompting.shots": shots}
    if shots:
        params["prompting.selection"] = trial.suggest_categorical("prompting.selection", list(SELECTIONS))
    params["prompting.calibrate"] = trial.suggest_categorical("prompting.calibrate", [False, True])
    return params


register(
    Method(
        name="prompting",
        config_class=PromptingConfig,
        attach=attach,
        detach=detach,
        summary="a hand-written template with k solved examples, labels scored by verbaliser likelihood; no training",
        fit=fit,
        render=render,
        score=score,
        search=search,
    )
)
