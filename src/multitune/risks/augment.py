"""Counterfactual data augmentation (Lu et al. 2018, "Gender Bias in Neural Natural Language Processing",
section 4; ``train --counterfactual-augment``): every training row that mentions an attribute term gets each of
its counterfactuals (the audit's own rewrite, :mod:`multitune.risks.lexicons`) added with the same label, so no
term of the lexicon can predict the label on its own. Only the training split grows: validation and test stay
the user's rows, so what the run reports is measured on real data."""

from __future__ import annotations

from collections.abc import Sequence

from multitune.data import Example, Splits
from multitune.risks.audit import lexicon_variants, lexicons_of
from multitune.risks.lexicons import Lexicon


def augment(examples: Sequence[Example], lexicons: Sequence[Lexicon]) -> list[Example]:
    """``examples`` followed by every counterfactual of each of them (an attribute's rewrites one after
    another), with the original's label or response; a counterfactual equal to a row already there is left out."""
    out = list(examples)
    seen = {(e.text, e.text_pair) for e in out}
    for lexicon in lexicons:
        variants = lexicon_variants(lexicon)
        for example in examples:
            for new in variants(example):
                if (new.text, new.text_pair) not in seen:
                    seen.add((new.text, new.text_pair))
                    out.append(new)
    return out


def augment_splits(
    splits: Splits, attributes: Sequence[str] | None, lexicon: str | None, language: str
) -> Splits:
    """``splits`` with the training split augmented (``attributes``: None for every built-in one)."""
    lexicons = lexicons_of(attributes, lexicon, language)
    return Splits(augment(splits.train, lexicons), splits.validation, splits.test, splits.labels)
