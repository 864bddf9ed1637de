"""Prompting's text: the template, the instruction, the shots and the chat template, within a token budget.

Plain rendering (base decoders, T5, ``--prompting-chat off``) is one document to continue::

    instruction  SEP  shot_1  SEP  ...  SEP  shot_k  SEP  query

where a shot is the template filled with a training example and its answer, and the query is the template up
to the answer slot (``{label}`` or ``{response}``). Chat rendering (classification on a decoder whose tokenizer
has a chat template: ``--prompting-chat auto`` or ``on``) gives the same parts as a conversation, through the
tokenizer's own ``apply_chat_template``::

    user: instruction SEP shot_1's input      assistant: shot_1's answer
    user: shot_2's input                       assistant: shot_2's answer     ...
    user: the query's input                    assistant: <the verbaliser is scored here>

An instruct model was tuned to answer a user turn in exactly this markup; read as plain text, the same words
are a document of no known kind. Shots are turns of their own, not lines inside the query's turn: on
SmolLM2-135M-Instruct with 4 shots, 0.547 against 0.527 accuracy on 300 SST-2 dev sentences and 0.337 against
0.213 on 300 held-out TREC training questions (the same shots, before calibration). A
turn's input is the template up to the answer slot, its end trimmed; the assistant's answer is the verbaliser
alone, so the label is scored from the first token of the answer (no whitespace moved in front of it, as plain
rendering does after 'Answer:'). The instruction and template defaults of chat rendering are their own
(``CHAT_INSTRUCTION``, ``CHAT_TEMPLATES``), built from the label names only, so they fit any task.

Generation prompts are rendered as plain text and then, like every generation prompt, wrapped in one user
turn by :func:`multitune.encode.prompt_ids` when the tokenizer has a chat template.

When the prompt is longer than the budget, shots are dropped (the first, i.e. least similar, first), then the
input's text is cut at its end; the answer slot is never cut off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from multitune.data import Example

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel, TaskSpec
    from multitune.methods.prompting import PromptingConfig
    from multitune.models import Base

PLACEHOLDERS = ("text", "input", "text_pair", "label", "response", "labels")
PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
CHAT_MODES = ("auto", "on", "off")
DEFAULT_TEMPLATES = {
    "classification": "{text}\nAnswer: {label}",
    "pair": "{text}\n{text_pair}\nAnswer: {label}",
    "generation": "{text}\n{response}",
}
DEFAULT_INSTRUCTION = "Answer with one of: {labels}."  # classification only
CHAT_TEMPLATES = {
    "classification": "Text: {text}\nAnswer: {label}",
    "pair": "Text: {text}\nText: {text_pair}\nAnswer: {label}",
}
CHAT_INSTRUCTION = "Classify the text into one of these categories: {labels}. Answer with the category only."


def template_problems(template: str | None, instruction: str | None) -> list[str]:
    """What is wrong with a template and an instruction on their own (the task's kind is checked at attach)."""
    problems = []
    for name, text, allowed in (
        ("template", template, PLACEHOLDERS),
        ("instruction", instruction, ("labels",)),
    ):
        unknown = sorted(set(PLACEHOLDER.findall(text or "")) - set(allowed))
        if unknown:
            problems.append(
                f"prompting {name} has unknown placeholder(s) {braced(unknown)}; it may use "
                f"{braced(allowed)}: fix --prompting-{name}"
            )
    found = PLACEHOLDER.findall(template or "")
    if "label" in found and "response" in found:
        problems.append(
            "prompting template holds both {label} and {response}; use {label} for classification "
            "and {response} for generation: fix --prompting-template"
        )
    for slot in ("label", "response"):
        if found.count(slot) > 1:
            problems.append(
                f"prompting template holds {{{slot}}} {found.count(slot)} times; it goes once, where "
                "the answer goes: fix --prompting-template"
            )
    if template is not None and not {"text", "input", "text_pair"} & set(found):
        problems.append(
            "prompting template has no {text} (or {input}), so the model would never see the input: "
            "fix --prompting-template, e.g. '{text}\\nAnswer: {label}'"
        )
    return problems


def kind_problems(base: Base, config: PromptingConfig, kind: str) -> list[str]:
    """What is wrong with the template and the chat setting for a task of ``kind`` on ``base``."""
    problems = []
    found = set(PLACEHOLDER.findall(config.template or "")) | set(
        PLACEHOLDER.findall(config.instruction or "")
    )
    slot = "{label}" if kind == "classification" else "{response}"
    if config.template is not None and slot not in config.template:
        example = (
            "'{text}\\nAnswer: {label}'"
            if kind == "classification"
            else "'Question: {text}\\nAnswer: {response}'"
        )
        problems.append(
            f"a {kind} template needs {slot} where the answer goes, e.g. --prompting-template {example}"
        )
    wrong = sorted(found & {"label", "labels", "text_pair"})
    if kind == "generation" and wrong:
        problems.append(
            f"{braced(wrong)} are for classification tasks; a generation template uses {{text}} and "
            "{response}: fix --prompting-template / --prompting-instruction"
        )
    has_template = base.arch == "decoder" and bool(getattr(base.tokenizer, "chat_template", None))
    if config.chat == "on" and not has_template:
        problems.append(
            f"--prompting-chat on needs a decoder whose tokenizer has a chat template; {base.source} has none: "
            "use --prompting-chat auto (or off)"
        )
    if config.chat == "off" and kind == "generation" and has_template:  # encode.prompt_ids always uses it
        problems.append(
            "--prompting-chat off is for classification: a generation prompt goes through the tokenizer's "
            "chat template as every generation task's does; use --prompting-chat auto"
        )
    return problems


def braced(names: Sequence[str]) -> str:
    return ", ".join("{" + n + "}" for n in names)


def uses_chat(base: Base, config: PromptingConfig, kind: str) -> bool:
    """Whether a task's prompts go through the tokenizer's chat template (classification on a decoder)."""
    return (
        kind == "classification"
        and config.chat != "off"
        and base.arch == "decoder"
        and bool(getattr(base.tokenizer, "chat_template", None))
    )


def template_for(config: PromptingConfig, kind: str, pair: bool = False, chat: bool = False) -> str:
    if config.template is not None:
        return config.template
    if kind == "generation":
        return DEFAULT_TEMPLATES["generation"]
    return (CHAT_TEMPLATES if chat else DEFAULT_TEMPLATES)["pair" if pair else "classification"]


def instruction_for(config: PromptingConfig, kind: str, chat: bool = False) -> str:
    if config.instruction is not None:
        return config.instruction
    if kind != "classification":
        return ""
    return CHAT_INSTRUCTION if chat else DEFAULT_INSTRUCTION


def answer_space(base: Base, config: PromptingConfig, kind: str) -> str:
    """The whitespace that goes in front of a verbaliser: what ends the template before ``{label}`` in plain
    rendering (BPE vocabularies spell " great" as one token), none in chat (the answer opens the turn)."""
    if uses_chat(base, config, kind):
        return ""
    prefix = template_for(config, "classification").split("{label}", 1)[0]
    return prefix[len(prefix.rstrip()) :]


def fill(template: str, values: dict[str, str]) -> str:
    """Replace known ``{name}`` placeholders in one pass (values are never re-read; other braces stay)."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _values(example: Example, answer: str, listed: str) -> dict[str, str]:
    return {
        "text": example.text,
        "input": example.text,
        "text_pair": example.text_pair or "",
        "label": answer,
        "response": example.response or "",
        "labels": listed,
    }


def chat_text(tokenizer: Any, turns: list[tuple[str, str]], query: str) -> str:
    """The conversation (user, assistant) * turns + user query, the assistant's turn opened, as text.

    A template that writes the BOS token itself (Gemma's) would get a second one when the text is encoded,
    since the tokenizer adds its own: the template's is dropped then.
    """
    messages = []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": query})
    text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


def render_one(
    bank: MultiTaskModel,
    spec: TaskSpec,
    config: PromptingConfig,
    words: dict[str, str],
    example: Example,
    shots: list[Example],
    max_length: int,
) -> Example:
    """One example's prompt within ``max_length`` tokens; ``words`` maps labels to verbalisers.

    The result's ``text`` is the whole prompt (``text_pair`` folded in), ``label`` and ``response`` are kept.
    """
    classification = spec.kind == "classification"
    chat = uses_chat(bank.base, config, spec.kind)
    listed = ", ".join(words.values())
    template = template_for(config, spec.kind, example.text_pair is not None, chat)
    prefix = template.split("{label}" if classification else "{response}", 1)[0].rstrip()
    instruction = instruction_for(config, spec.kind, chat)
    head = [fill(instruction, {"labels": listed})] if instruction else []
    sep = config.shot_separator
    answers = [words.get(s.label or "", s.label or "") for s in shots]
    if chat:  # each shot its own user and assistant turns
        blocks: list[Any] = [
            (fill(prefix, _values(s, "", listed)), a) for s, a in zip(shots, answers, strict=True)
        ]
    else:
        blocks = [fill(template, _values(s, a, listed)) for s, a in zip(shots, answers, strict=True)]

    def compose(blocks: list[Any], query: Example) -> str:
        last = fill(prefix, _values(query, "", listed))
        if not chat:
            return sep.join([*head, *blocks, last])
        turns = list(blocks)
        if turns:  # the instruction opens the first user turn
            turns[0] = (sep.join([*head, turns[0][0]]), turns[0][1])
        else:
            last = sep.join([*head, last])
        return chat_text(bank.base.tokenizer, turns, last)

    budget, count = _budget(bank, spec, example, max_length)
    query = example
    for _ in range(len(blocks) + 4):
        text = compose(blocks, query)
        over = count(text) - budget
        if over <= 0:
            break
        if blocks:
            blocks = blocks[1:]  # the least similar (or, for random shots, the first drawn) goes first
            continue
        cut = _cut(bank.base.tokenizer, query.text, over)
        if cut == query.text:
            break  # nothing left to cut: encoding truncates what remains
        query = replace(query, text=cut)
    return Example(text=text, label=example.label, response=example.response)


def _budget(bank: MultiTaskModel, spec: TaskSpec, example: Example, max_length: int) -> tuple[int, Any]:
    """(token budget of the prompt, its token counter), as :func:`multitune.encode.encode_example` counts."""
    tokenizer = bank.base.tokenizer
    if spec.kind == "classification":
        return max_length, lambda text: len(tokenizer(text).input_ids)
    from multitune.encode import prompt_ids

    reserve = 0
    if bank.base.arch == "decoder" and example.response is not None:  # prompt and response share the context
        reserve = min(
            len(tokenizer(example.response, add_special_tokens=False).input_ids) + 1, max_length // 2
        )
    return max_length - reserve, lambda text: len(prompt_ids(bank.base, text))


def _cut(tokenizer: Any, text: str, over: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[: max(0, len(ids) - over)]) if ids else text
