"""Swap lexicons and the counterfactual rewrite of a text (Garg et al. 2019, "Counterfactual Fairness in Text
Classification through Robustness", section 3: swap identity terms and compare the predictions).

An attribute is a table of aligned terms: each row holds one term per class (gender: male, female), so the
counterpart of a term is the term of another class in the same row. A two-class attribute has one
counterfactual per text (every term swapped at once: "he loves her" -> "she loves him"); an attribute of
n classes (nationality, religion) has up to n - 1, one per target class, every term of another class
replaced by the target's. Matching is whole-word and case-insensitive, longest term first (so the Italian
"la ragazza" wins over "ragazza"), and the replacement keeps the case of what it replaces (``He`` -> ``She``,
``HIS`` -> ``HER``).

Italian agreement: nouns are listed with their articles ("il ragazzo" <-> "la ragazza", "un uomo" <-> "una
donna"), and an adjective of :data:`IT_ADJECTIVES` right after a swapped noun changes its ending (-o/-a,
-i/-e): "il ragazzo alto" <-> "la ragazza alta". Nothing else is parsed: an adjective far from its noun or a
verb's participle keeps its form (a limitation, stated in docs/risks.md).

Written here because no maintained library does case-preserving multi-class swaps with Italian agreement
(CheckList's perturbations are English-only and need spaCy).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multitune.errors import ConfigError, DataError

ATTRIBUTES = ("gender", "nationality", "religion", "age")
LANGUAGES = ("en", "it")

EN_GENDER: list[tuple[str, ...]] = [
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"),
    ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"),
    ("husband", "wife"), ("husbands", "wives"), ("king", "queen"), ("kings", "queens"), ("mr", "mrs"),
    ("sir", "madam"), ("uncle", "aunt"), ("nephew", "niece"), ("gentleman", "lady"), ("gentlemen", "ladies"),
    ("male", "female"), ("boyfriend", "girlfriend"), ("dad", "mom"), ("grandfather", "grandmother"),
]  # fmt: skip
EN_NAMES: list[tuple[str, str]] = [
    ("john", "mary"), ("james", "jennifer"), ("michael", "linda"), ("david", "susan"), ("robert", "patricia"),
    ("william", "elizabeth"), ("paul", "sarah"), ("mark", "emma"), ("peter", "anna"), ("thomas", "laura"),
]  # fmt: skip
IT_NAMES: list[tuple[str, str]] = [
    ("marco", "giulia"), ("luca", "francesca"), ("giuseppe", "maria"), ("giovanni", "anna"),
    ("paolo", "chiara"), ("andrea", "sara"), ("matteo", "elena"), ("alessandro", "martina"),
]  # fmt: skip
# Italian nouns: masculine, feminine, and their articles (definite, indefinite); plurals are listed apart.
IT_NOUNS = [
    ("ragazzo", "ragazza", "il", "la", "un", "una"), ("uomo", "donna", "l'", "la", "un", "una"),
    ("padre", "madre", "il", "la", "un", "una"), ("figlio", "figlia", "il", "la", "un", "una"),
    ("fratello", "sorella", "il", "la", "un", "una"), ("marito", "moglie", "il", "la", "un", "una"),
    ("re", "regina", "il", "la", "un", "una"), ("signore", "signora", "il", "la", "un", "una"),
    ("nonno", "nonna", "il", "la", "un", "una"), ("zio", "zia", "lo", "la", "uno", "una"),
    ("bambino", "bambina", "il", "la", "un", "una"),
]  # fmt: skip
IT_PLURALS = [
    ("ragazzi", "ragazze", "i", "le"), ("uomini", "donne", "gli", "le"), ("padri", "madri", "i", "le"),
    ("figli", "figlie", "i", "le"), ("fratelli", "sorelle", "i", "le"), ("mariti", "mogli", "i", "le"),
    ("bambini", "bambine", "i", "le"), ("nonni", "nonne", "i", "le"),
]  # fmt: skip
IT_GENDER: list[tuple[str, ...]] = [
    ("lui", "lei"),
    ("egli", "ella"),
    ("maschio", "femmina"),
    ("signor", "signora"),
]
IT_ADJECTIVES = [
    "alto", "basso", "bello", "brutto", "bravo", "buono", "cattivo", "ricco", "povero", "vecchio", "nuovo",
    "simpatico", "antipatico", "onesto", "sincero", "stanco", "contento", "famoso", "nervoso", "tranquillo",
    "arrabbiato", "italiano", "straniero", "giovanissimo", "magro", "grasso", "generoso", "pigro",
]  # fmt: skip

NATIONALITY: dict[str, list[tuple[str, ...]]] = {
    "en": [
        ("american",), ("italian",), ("french",), ("german",), ("chinese",), ("mexican",), ("indian",),
        ("nigerian",), ("russian",), ("japanese",), ("brazilian",), ("arab",),
    ],
    "it": [
        ("americano", "americana"), ("italiano", "italiana"), ("francese", "francese"),
        ("tedesco", "tedesca"), ("cinese", "cinese"), ("messicano", "messicana"), ("indiano", "indiana"),
        ("nigeriano", "nigeriana"), ("russo", "russa"), ("giapponese", "giapponese"),
        ("marocchino", "marocchina"), ("rumeno", "rumena"),
    ],
}  # fmt: skip
RELIGION: dict[str, list[tuple[str, ...]]] = {
    "en": [
        ("christian", "christians", "church"), ("muslim", "muslims", "mosque"), ("jewish", "jews", "synagogue"),
        ("hindu", "hindus", "temple"), ("buddhist", "buddhists", "monastery")
    ],
    "it": [
        ("cristiano", "cristiani", "chiesa"), ("musulmano", "musulmani", "moschea"),
        ("ebreo", "ebrei", "sinagoga"), ("induista", "induisti", "tempio"), ("buddista", "buddisti", "monastero"),
    ],
}  # fmt: skip
AGE: dict[str, list[tuple[str, ...]]] = {
    "en": [
        ("young", "old"), ("younger", "older"), ("youngest", "oldest"), ("teenager", "elderly"),
        ("teenagers", "pensioners"), ("youth", "elder"), ("kid", "retiree"), ("kids", "retirees"),
        ("student", "pensioner"), ("students", "seniors"),
    ],
    "it": [
        ("giovane", "anziano"), ("giovani", "anziani"), ("adolescente", "pensionato"),
        ("adolescenti", "pensionati"), ("ragazzino", "vecchietto"), ("studente", "pensionato"),
    ],
}  # fmt: skip
# CheckList's invariance perturbations: a name for another of the same gender, a place for another place.
PLACES = {
    "en": [
        "london",
        "paris",
        "chicago",
        "tokyo",
        "berlin",
        "madrid",
        "toronto",
        "sydney",
        "boston",
        "dublin",
    ],
    "it": [
        "roma",
        "milano",
        "napoli",
        "torino",
        "firenze",
        "bologna",
        "venezia",
        "palermo",
        "genova",
        "bari",
    ],
}


@dataclass
class Lexicon:
    """One attribute: ``rows`` of aligned terms, one per class (all lower case; a term may be a phrase)."""

    attribute: str
    classes: list[str]
    rows: list[tuple[str, ...]]
    followers: dict[str, str] = field(default_factory=dict)  # adjective -> its other-gender form
    _index: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _pattern: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for r, row in enumerate(self.rows):
            for c, term in enumerate(row):
                self._index.setdefault(term.lower(), (r, c))  # the first row wins: "her" -> "his"
        terms = sorted(self._index, key=len, reverse=True)
        follow = ""
        if self.followers:
            adjectives = "|".join(sorted(map(re.escape, self.followers), key=len, reverse=True))
            follow = rf"(?:(\s+)({adjectives})(?!\w))?"
        body = "|".join(re.escape(t) for t in terms)
        self._pattern = re.compile(rf"(?<![\w'])({body})(?![\w']){follow}", re.IGNORECASE)

    def terms(self) -> list[str]:
        return list(self._index)

    def mentions(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None

    def counterfactuals(self, text: str) -> list[str]:
        """Each rewrite of ``text`` (none when it mentions no term); see the module docstring."""
        return [variant[0] for variant in self.variants([text])]

    def variants(self, texts: Sequence[str]) -> list[list[str]]:
        """Each counterfactual of a row of several texts (a text and its pair), every text rewritten towards
        the same target class; none when no text mentions a term, no rewrite twice."""
        if not any(self.mentions(text) for text in texts):
            return []
        n = len(self.classes)
        targets: list[Callable[[int], int]] = [lambda c: 1 - c] if n == 2 else [_to(t) for t in range(n)]
        out: list[list[str]] = []
        for target in targets:
            new = [self._rewrite(text, target) for text in texts]
            if new != list(texts) and new not in out:
                out.append(new)
        return out

    def _rewrite(self, text: str, target: Callable[[int], int]) -> str:
        def swap(match: re.Match[str]) -> str:
            word = match.group(1)
            r, c = self._index[word.lower()]
            t = target(c)
            new = _cased(self.rows[r][t], word)
            if self.followers and match.group(3):
                adjective = match.group(3)
                changed = t != c
                new += match.group(2) + (
                    _cased(self.followers[adjective.lower()], adjective) if changed else adjective
                )
            elif self.followers and match.group(2):
                new += match.group(2)
            return new

        assert self._pattern is not None
        return self._pattern.sub(swap, text)


def _to(target: int) -> Callable[[int], int]:
    return lambda _: target


def _cased(replacement: str, original: str) -> str:
    """``replacement`` in the case of ``original``: UPPER, Title or lower."""
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _italian_gender() -> Lexicon:
    rows: list[tuple[str, ...]] = []
    for m, f, m_def, f_def, m_ind, f_ind in IT_NOUNS:
        joint = "" if m_def.endswith("'") else " "
        rows += [(f"{m_def}{joint}{m}", f"{f_def} {f}"), (f"{m_ind} {m}", f"{f_ind} {f}")]
    for m, f, m_def, f_def in IT_PLURALS:
        rows.append((f"{m_def} {m}", f"{f_def} {f}"))
    rows += [(m, f) for m, f, *_ in IT_NOUNS] + [(m, f) for m, f, *_ in IT_PLURALS]
    rows += [*IT_GENDER, *IT_NAMES]
    followers: dict[str, str] = {}
    for adjective in IT_ADJECTIVES:
        stem = adjective[:-1]
        if adjective.endswith("ico"):
            plural, feminine_plural = stem + "i", stem + "he"  # simpatici, simpatiche
        elif stem.endswith("c") or stem.endswith("g"):
            plural, feminine_plural = stem + "hi", stem + "he"  # stanchi, stanche
        elif stem.endswith("i"):
            plural, feminine_plural = stem, stem + "e"  # vecchi, vecchie
        else:
            plural, feminine_plural = stem + "i", stem + "e"
        followers |= {stem + "o": stem + "a", stem + "a": stem + "o"}
        followers |= {plural: feminine_plural, feminine_plural: plural}
    return Lexicon("gender", ["male", "female"], rows, followers)


def builtin(attribute: str, language: str = "en") -> Lexicon:
    """The built-in lexicon of ``attribute`` in ``language``."""
    check_attributes([attribute])
    if language not in LANGUAGES:
        raise ConfigError(f"language '{language}' has no built-in lexicon; use {' or '.join(LANGUAGES)}")
    if attribute == "gender":
        if language == "it":
            return _italian_gender()
        return Lexicon("gender", ["male", "female"], [*EN_GENDER, *EN_NAMES])
    if attribute == "age":
        return Lexicon("age", ["young", "old"], list(AGE[language]))
    table: list[tuple[str, ...]] = NATIONALITY[language] if attribute == "nationality" else RELIGION[language]
    classes = [row[0] for row in table]
    return Lexicon(attribute, classes, [tuple(column) for column in zip(*table, strict=True)])


def check_attributes(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise ConfigError(
            f"unknown attribute {', '.join(repr(n) for n in unknown)}; choose from {', '.join(ATTRIBUTES)} "
            "(or give your own pairs with --lexicon FILE)"
        )
    return names


def read_lexicon(path: str | Path, attribute: str = "custom") -> Lexicon:
    """A user lexicon: a CSV or TSV of two columns, ``term,counterpart`` (a header row of those names is
    skipped); each pair swaps both ways."""
    path = Path(path)
    expected = "two columns, term,counterpart (CSV, or TSV with a .tsv name)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read lexicon {path} ({error}); give a file of {expected}") from error
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
    rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines(), delimiter=delimiter)]
    rows = [row for row in rows if any(row)]
    if rows and [c.lower() for c in rows[0]] == ["term", "counterpart"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows, 1) if len(row) != 2 or not all(row)]
    if not rows or bad:
        where = f" (rows {', '.join(map(str, bad[:5]))} are not)" if bad else " (it is empty)"
        raise DataError(f"lexicon {path} must have {expected}{where}")
    return Lexicon(attribute, ["term", "counterpart"], [(a.lower(), b.lower()) for a, b in rows])


def name_swapper(language: str = "en") -> Lexicon:
    """CheckList's name perturbation: each first name swapped with another of the same gender."""
    names = EN_NAMES if language == "en" else IT_NAMES
    return _pairs("names", [m for m, _ in names] + [f for _, f in names])


def place_swapper(language: str = "en") -> Lexicon:
    """CheckList's location perturbation: each city swapped with another city."""
    return _pairs("locations", PLACES[language])


def _pairs(attribute: str, terms: list[str]) -> Lexicon:
    """Consecutive terms swapped in pairs (an odd last one is left out)."""
    return Lexicon(attribute, ["a", "b"], list(zip(terms[0::2], terms[1::2], strict=False)))
