"""General-text perplexity: how much of its general language ability a model keeps after a task is trained.

Fine-tuning a language model on one task can make it worse at everything else ("catastrophic forgetting", the
seeds' "loss of general abilities"). The measure here is the teacher-forced perplexity of plain general text,
with no chat template and no prompt, through a task's parameters (its LoRA, prompt or prefix routed in) or
through the bare base::

    ppl = exp( sum_i sum_{t>1} -log p(x_{i,t} | x_{i,<t}) / sum_i (n_i - 1) )

over the texts i of n_i tokens each (the tokenizer's special tokens included as it adds them: a BOS token
that a Llama tokenizer puts first makes every word scored; GPT-2 adds none, so a text's first word is only
context). The perplexity is of all tokens pooled, not a mean of per-text perplexities, so long texts weigh by
their length. An adapter that forgets nothing of the base (a zero-initialised LoRA, or one that learned little)
scores the base's perplexity; full fine-tuning on narrow data usually raises it the most.

An encoder-decoder (T5) gets each text as its decoder target with an empty encoder input (the tokenizer's
encoding of ""): every target token is scored, the first one predicted from the decoder's start token. That
is T5's unconditional language model, which T5 was never trained to be, so its perplexities are high; they
still compare a task with its base. Encoders have no language-model head and are refused.

:data:`GENERAL_SAMPLE` is a small built-in sample (40 short paragraphs written for this project: science,
history, everyday instructions, news-like reports, dialogue), cheap enough to score after every training run;
:func:`read_general` reads the user's own sample instead (``--general-data FILE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.encode import collate, to_device
from multitune.errors import ConfigError, DataError
from multitune.methods import get_method

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet")
TEXT_COLUMN = "text"

GENERAL_SAMPLE: list[str] = [
    # science
    "Water boils at a lower temperature on a mountain than at sea level, because the air pressure pressing on "
    "its surface is lower. Cooks at high altitude often add a few minutes to the time a recipe asks for.",
    "A leaf looks green because chlorophyll absorbs mostly red and blue light and reflects the green part of the "
    "spectrum. In autumn the chlorophyll breaks down, and the yellow and orange pigments beneath it show through.",
    "The Moon has no atmosphere to spread heat around, so the ground in sunlight can be hotter than boiling water "
    "while the ground a few metres away, in shadow, stays far below freezing.",
    "When you stretch a rubber band and hold it against your lip, it feels warm; let it contract and it feels "
    "cool. The long molecules inside become more ordered when stretched, and the change gives off heat.",
    "Vaccines train the immune system by showing it a harmless piece or copy of a germ. If the real germ arrives "
    "later, the body recognises it quickly and fights it off before it can cause serious illness.",
    "Earthquakes happen when rock on either side of a fault that has been locked for years slips suddenly. The "
    "energy travels outward as waves, and the fastest of them reach distant instruments within minutes.",
    "Sound needs something to travel through. In air it moves at roughly three hundred and forty metres per "
    "second, in water about four times faster, and in the empty space between planets it does not travel at all.",
    "Bees find their way back to the hive using the position of the sun, and they tell one another where flowers "
    "are with a dance whose direction and length describe the angle and the distance.",
    # history
    "The printing press with movable metal type spread across Europe in the second half of the fifteenth century. "
    "Books became cheaper, more people learned to read, and ideas could travel faster than ever before.",
    "For centuries the Silk Road was not a single road but a web of routes linking China with Central Asia, "
    "Persia and the Mediterranean. Merchants carried silk, spices and paper, and with them religions and "
    "languages.",
    "The first public railway to carry passengers with steam locomotives opened in England in the early "
    "nineteenth century. Within a few decades railways had changed how far people could live from where they "
    "worked.",
    "Ancient Egyptian farmers planned their year around the flooding of the Nile. The river rose every summer and "
    "left behind a layer of dark, fertile mud in which wheat and barley grew well.",
    "During the long voyages of the age of sail, many sailors suffered from scurvy. Captains eventually learned "
    "that fresh fruit, especially lemons and limes, kept their crews healthy.",
    "The city of Venice was built on wooden piles driven into the mud of a lagoon. Because the wood stayed under "
    "water, away from the air, much of it has lasted for hundreds of years.",
    "Before clocks were common, many towns kept time by the sun, so noon in one town came a few minutes earlier "
    "than in a town to its west. Railway timetables made standard time zones necessary.",
    "The first women to vote in a national election did so at the end of the nineteenth century. Over the next "
    "fifty years, country after country extended the vote to women.",
    # everyday instructions
    "To make a simple loaf of bread, mix flour, water, yeast and a little salt, knead the dough for ten minutes, "
    "and leave it covered in a warm place until it has doubled in size. Shape it, let it rise again, then bake it "
    "in a hot oven.",
    "If your bicycle chain keeps slipping, first check that it is clean and lightly oiled. A chain that is worn "
    "and stretched will not sit properly on the teeth and should be replaced.",
    "Before painting a wall, wash off any dust and grease, fill the cracks, and let the filler dry. Sand it smooth, "
    "protect the floor with a sheet, and apply two thin coats rather than one thick one.",
    "To keep cut flowers fresh for longer, trim the stems at an angle, remove any leaves that would sit under the "
    "water, and change the water every two days.",
    "When you pack for a trip, lay out everything you think you need, then put half of it back. Roll clothes "
    "instead of folding them, and keep your documents and medicine in the bag you carry with you.",
    "If a smoke alarm beeps once every minute or so, its battery is usually running low. Replace the battery, "
    "press the test button, and write the date on the back so you know when it was changed.",
    "To change a flat tyre, park on level ground, loosen the wheel nuts a little, and only then raise the car with "
    "the jack. Swap the wheel, tighten the nuts in a star pattern, and check the pressure of the spare.",
    "Rice cooks more evenly if you rinse it first until the water runs clear. Use about one and a half cups of "
    "water for each cup of rice, simmer with the lid on, and let it rest for five minutes before serving.",
    # news-like
    "The city council voted on Tuesday to extend the opening hours of public libraries on weekends. The change "
    "will take effect next month and is expected to cost less than the council had first estimated.",
    "Heavy rain overnight caused flooding in several low-lying streets, and some trains were delayed during the "
    "morning rush. Forecasters expect drier weather to return by the end of the week.",
    "A local school has opened a garden where pupils grow vegetables and learn how food reaches their plates. "
    "Teachers say attendance on gardening days is noticeably higher than on other days.",
    "The museum reopened after two years of renovation, with new rooms for its collection of old maps and a cafe "
    "overlooking the river. Entry remains free for children and students.",
    "Officials announced that the bridge on the main road north of the town will close for repairs from the first "
    "of June. Drivers are advised to use the ring road, which may add ten minutes to their journey.",
    "Researchers at the university reported that a new kind of battery kept most of its capacity after thousands "
    "of charging cycles. They cautioned that it may take years before such batteries reach the shops.",
    "The annual marathon drew more than eight thousand runners this year. The winner finished just over two hours "
    "after the start, and volunteers handed out water at stations along the route.",
    "Farmers in the region say the dry spring has shortened the growing season. Prices of some vegetables at the "
    "market have risen, although traders expect them to fall again after the harvest.",
    # dialogue
    '"Are you coming to the concert tonight?" she asked. "I would love to," he said, "but I promised to help my '
    'brother move house. Maybe next time."',
    "Customer: Hello, I ordered a pair of shoes last week, but they have not arrived yet.\nAssistant: I am sorry "
    "to hear that. Could you give me your order number, and I will check where the parcel is?",
    '"Which way is the station?" the traveller asked. The old man pointed down the hill. "Follow this street until '
    'you reach the fountain, then turn left. You cannot miss it."',
    "A: Did you remember to water the plants while I was away?\nB: Every other day, as you asked. The tomatoes "
    "even have a few small green fruits now.\nA: Wonderful, thank you so much.",
    '"I think we should leave early tomorrow," said the guide. "The path over the pass is easier before noon, '
    'and the weather often turns in the afternoon."',
    "Doctor: How long have you had the cough?\nPatient: About a week. It is worse at night.\nDoctor: Any fever? "
    "Let me listen to your chest, and then we can talk about what might help.",
    '"Can you explain why the sky is blue?" the child asked. Her father thought for a moment. "Sunlight is made '
    "of many colours, and the air scatters the blue part more than the others, so blue comes at us from every "
    'direction."',
    "Waiter: Are you ready to order?\nGuest: Yes, I will have the soup of the day and then the grilled fish, "
    "please.\nWaiter: Of course. Would you like something to drink with that?",
]


# ---- reading a sample ------------------------------------------------------------------------------------
def read_general(path: str | Path | None) -> list[str]:
    """The general-text sample: :data:`GENERAL_SAMPLE` for None, else the texts of ``path``.

    A data table (.csv .tsv .json .jsonl .ndjson .parquet, read by :mod:`multitune.tables`) gives its ``text``
    column, one text per row; any other file is plain UTF-8 text: one text per block separated by blank lines,
    or, in a file without blank lines, one per line. Empty texts are dropped; a file left with none, or a table
    without a ``text`` column, is a one-line :class:`~multitune.errors.DataError`.
    """
    if path is None:
        return list(GENERAL_SAMPLE)
    path = Path(path)
    texts = _table_texts(path) if path.suffix.lower() in TABLE_SUFFIXES else _plain_texts(path)
    if not texts:
        raise DataError(
            f"{path} holds no general text; give one paragraph per line (or per blank-line separated block) "
            f"or a table with a non-empty '{TEXT_COLUMN}' column"
        )
    return texts


def _table_texts(path: Path) -> list[str]:
    from multitune.tables import read_table, shown

    rows = read_table(path)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if TEXT_COLUMN not in columns:
        raise DataError(
            f"{path} has no '{TEXT_COLUMN}' column for the general-text sample (columns: {shown(columns)}); "
            f"name the column of plain text '{TEXT_COLUMN}'"
        )
    values = [row.get(TEXT_COLUMN) for row in rows]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _plain_texts(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path} does not exist; check the --general-data path")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a text file; pass one file to --general-data")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (it holds NUL bytes); pass a UTF-8 text file to --general-data")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); re-save it as UTF-8"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    blocks: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line:
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks[0].split("\n") if len(blocks) == 1 else blocks  # no blank line: one text per line


# ---- the perplexity --------------------------------------------------------------------------------------
@torch.no_grad()
def general_perplexity(
    bank: MultiTaskModel,
    task: str | None,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """Teacher-forced perplexity of plain ``texts`` (each cut to ``max_length`` tokens) through ``task``.

    ``task``: its parameters are routed in (LoRA, (IA)^3, adapters, a soft prompt or prefix before the text; a
    classification task's too, its head unused: the LM head scores the tokens); prompting changes nothing
    here, since no template is applied. None: the bare base, every adapter off (:meth:`MultiTaskModel.disabled`);
    refused when a task of the bank owns the base weights (full fine-tuning), since those weights are no longer
    the base's. A task merged into the base (:meth:`MultiTaskModel.merge`) is part of what None measures.
    The formula and the seq2seq convention are in the module's docstring.
    """
    base = bank.base
    if base.arch == "encoder":
        raise ConfigError(
            f"general-text perplexity needs a language model; {base.source} is an encoder (no LM head). "
            "Use a decoder such as smollm2-135m, or a seq2seq model"
        )
    if task is None:
        owners = [name for name, spec in bank.tasks.items() if get_method(spec.method).changes_base]
        if owners:
            raise ConfigError(
                f"task '{owners[0]}' owns this bank's base weights (full fine-tuning), so they are not the "
                "base's; measure the base's general-text perplexity on a bank without it"
            )
    else:
        bank.spec(task)  # an unknown task: the error names the bank's tasks
    features = [f for f in (_features(bank, text, max_length) for text in texts) if f is not None]
    if not features:  # (each feature left has at least one token to score)
        raise ConfigError(
            "no general text to score: every text is empty or a single token; give texts of a few words"
        )
    slot = 0 if task is None else bank.slots.index(task)
    total, count = _nll(bank, task, features, slot, batch_size)
    return math.exp(total / count)


def _features(bank: MultiTaskModel, text: str, max_length: int) -> dict[str, Any] | None:
    """One text as a batch feature: a decoder's ``input_ids`` are their own ``labels`` (the shift is
    :meth:`MultiTaskModel.target_logits`'s); seq2seq gets an empty encoder input and the text as target."""
    tokenizer = bank.base.tokenizer
    if bank.base.arch == "seq2seq":
        target = list(tokenizer(text_target=text, truncation=True, max_length=max_length).input_ids)
        empty = list(tokenizer("").input_ids) or [tokenizer.eos_token_id or tokenizer.pad_token_id or 0]
        return {"input_ids": empty, "labels": target} if target else None
    ids = list(tokenizer(text, truncation=True, max_length=max_length).input_ids)
    return {"input_ids": ids, "labels": ids} if len(ids) > 1 else None


def _nll(
    bank: MultiTaskModel, task: str | None, features: list[dict[str, Any]], slot: int, batch_size: int
) -> tuple[float, int]:
    """Summed token NLL and the number of tokens scored, in batches, in eval mode (the mode restored after)."""
    from contextlib import nullcontext

    from multitune.training.evaluate import autocast

    pad = bank.base.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    was_training = bank.training
    bank.eval()
    total, count = 0.0, 0
    try:
        with bank.disabled() if task is None else nullcontext():
            for start in range(0, len(features), batch_size):
                chunk = features[start : start + batch_size]
                batch = to_device(collate(chunk, pad, slot), bank.base.device)
                with autocast(bank):
                    nll, n = bank.lm_loss(batch)
                total, count = total + float(nll), count + int(n)
    finally:
        bank.train(was_training)
    return total, count
