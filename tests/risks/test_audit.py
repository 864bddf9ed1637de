"""The bias audit and counterfactual augmentation (issue 18) on a tiny encoder whose vocabulary has gendered
words: lexicon swaps (case, Italian agreement), a planted bias found and an unbiased control passed, augmentation
lowering the planted flip rate, the report's files, and bad inputs with one line each."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from helpers import NEGATIVE, POSITIVE, WORDS, tiny_model

from multitune.cli import main
from multitune.risks.lexicons import builtin, name_swapper, place_swapper, read_lexicon

GENDERED = ["he", "she", "him", "her", "his", "man", "woman", "john", "mary", "london", "paris"]
FILLER = WORDS[13:]


def save_gendered(folder: Path, family: str = "bert") -> Path:
    """helpers.save_tiny's model of ``family`` with the gendered words in its word-level vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + GENDERED)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [SEP] $B", special_tokens=[("[BOS]", 2), ("[SEP]", 4)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        sep_token="[SEP]",
    )  # fmt: skip
    model = tiny_model(family)
    model.resize_token_embeddings(
        len(vocab), mean_resizing=False
    )  # the mean would give every new word one vector
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(path: Path, rows: list[tuple[str, str]], extra: list[str] | None = None) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", *(["group"] if extra else [])])
        for i, (text, label) in enumerate(rows):
            writer.writerow([text, label, *([extra[i]] if extra else [])])
    return path


def sentiment_rows(n: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def gendered_rows(n: int, rng: random.Random, planted: bool, sentiment: int = 2) -> list[tuple[str, str]]:
    """A gender word and filler, labelled by the gender (planted: 'he' pos, 'she' neg); or a gender word,
    ``sentiment`` sentiment words and filler, labelled by the sentiment (the control's rows, the rows audited)."""
    out = []
    for i in range(n):
        gender = "he" if i % 2 == 0 else "she"
        positive = rng.random() < 0.5
        words = [gender, *rng.sample(FILLER, 3)]
        if not planted:
            words += rng.sample(POSITIVE if positive else NEGATIVE, sentiment)
        rng.shuffle(words)
        label = ("pos" if gender == "he" else "neg") if planted else ("pos" if positive else "neg")
        out.append((" ".join(words), label))
    return out


# Full fine-tuning (embeddings frozen) learns the toy task to ~97% in 12 epochs; the tiny LoRA stays near 90%, too
# close to the noise for a one-point accuracy comparison. Validation on sentiment rows only: the task itself.
TRAIN = ["--method", "full", "--epochs", "12", "--learning-rate", "0.001", "--patience", "100", "--batch-size", "8",
         "--warmup-ratio", "0", "--max-length", "16", "--quiet"]  # fmt: skip


def train(model: str, folder: Path, data: Path, validation: Path, *extra: str) -> Path:
    code = main(["train", "--model", model, "--data", str(data), "--validation-data", str(validation),
                 "--output", str(folder), *TRAIN, *extra])  # fmt: skip
    assert code == 0
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny gendered model; a run trained where 'he'/'she' decides the label of the rows without sentiment (planted),
    the same with counterfactual augmentation, an unbiased control; audit rows and sentiment-only rows."""
    tmp = tmp_path_factory.mktemp("audit")
    model = str(save_gendered(tmp / "bert"))
    rng = random.Random(0)
    planted = write(tmp / "planted.csv", sentiment_rows(160, rng) + gendered_rows(64, rng, planted=True))
    control = write(tmp / "control.csv", sentiment_rows(160, rng) + gendered_rows(64, rng, False, 1))
    validation = write(tmp / "validation.csv", sentiment_rows(40, random.Random(7)))
    augment = ["--counterfactual-augment", "--counterfactual-attributes", "gender"]
    return {
        "model": Path(model),
        "planted": train(model, tmp / "planted", planted, validation),
        "augmented": train(model, tmp / "augmented", planted, validation, *augment),
        "control": train(model, tmp / "control", control, validation),
        "audit_data": write(tmp / "audit.csv", gendered_rows(60, random.Random(5), False, 1)),
        "sentiment": write(tmp / "sentiment.csv", sentiment_rows(200, random.Random(6))),
        "tmp": tmp,
    }


def audit(run: Path, data: Path, *flags: str) -> dict:
    out = run.parent / f"{run.name}-audit-{abs(hash(flags))}"
    assert main(["audit", str(run), "--data", str(data), "--output", str(out), *flags]) == 0
    return json.loads((out / "audit.json").read_text())


# ---- lexicons -----------------------------------------------------------------------------------------------
def test_english_swaps_keep_case_and_whole_words() -> None:
    gender = builtin("gender")
    assert gender.counterfactuals("He told HIS wife about them") == ["She told HER husband about them"]
    assert gender.counterfactuals("she saw him; Mr Smith and John") == ["he saw her; Mrs Smith and Mary"]
    assert gender.counterfactuals("the theme hence") == []  # 'he' inside a word is no term
    assert gender.mentions("The Woman") and gender.counterfactuals("The Woman") == ["The Man"]


def test_italian_gender_agreement_of_articles_and_adjectives() -> None:
    gender = builtin("gender", "it")
    assert gender.counterfactuals("Il ragazzo alto parla") == ["La ragazza alta parla"]
    assert gender.counterfactuals("un uomo simpatico") == ["una donna simpatica"]
    assert gender.counterfactuals("la ragazza stanca e lei") == ["il ragazzo stanco e lui"]
    assert gender.counterfactuals("I ragazzi bravi") == ["Le ragazze brave"]
    assert gender.counterfactuals("L'uomo e la donna") == ["La donna e l'uomo"]
    assert gender.counterfactuals("il ragazzo lavora, alto") == ["la ragazza lavora, alto"]  # not right after


def test_attributes_of_many_classes_give_one_rewrite_per_other_class() -> None:
    nationality = builtin("nationality").counterfactuals("the italian chef")
    assert "the french chef" in nationality and "the italian chef" not in nationality
    assert len(nationality) == len(builtin("nationality").classes) - 1
    religion = builtin("religion").counterfactuals("Muslims pray in the mosque")
    assert "Christians pray in the church" in religion
    assert builtin("age").counterfactuals("a young teenager") == ["a old elderly"]
    assert builtin("nationality", "it").counterfactuals("una cuoca italiana")[0] == "una cuoca americana"


def test_invariance_swappers_and_user_lexicon(tmp_path: Path) -> None:
    assert name_swapper().counterfactuals("John met Mary") == ["James met Jennifer"]
    assert place_swapper().counterfactuals("from London") == ["from Paris"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("term,counterpart\nfilm,movie\n")
    assert read_lexicon(pairs).counterfactuals("A film, a Movie") == ["A movie, a Film"]


# ---- the audit on trained tasks -----------------------------------------------------------------------------
def accuracy(run: Path, data: Path) -> float:
    from multitune.api import load
    from multitune.data import load_examples

    return load(run).evaluate(load_examples(data, "classification"))["accuracy"]


def test_planted_bias_is_found_and_the_control_passes(world: dict[str, Path], capsys) -> None:
    planted = audit(world["planted"], world["audit_data"], "--attributes", "gender")["attributes"]["gender"]
    assert planted["tested"] == 60 and planted["flip_rate"] >= 0.2
    low, high = planted["flip_rate_ci"]
    assert low <= planted["flip_rate"] <= high and high - low > 0
    assert planted["worst"][0]["label"] != planted["worst"][0]["counterfactual_label"]
    assert "gender: 60 rows tested, flip rate" in capsys.readouterr().out
    control = audit(world["control"], world["audit_data"], "--attributes", "gender")["attributes"]["gender"]
    assert control["tested"] == 60 and control["flip_rate"] <= 0.02
    assert control["mean_abs_delta_p"] < planted["mean_abs_delta_p"]


def test_counterfactual_augmentation_halves_the_planted_flip_rate(world: dict[str, Path]) -> None:
    flips = {
        run: audit(world[run], world["audit_data"], "--attributes", "gender")["attributes"]["gender"][
            "flip_rate"
        ]
        for run in ("planted", "augmented")
    }
    assert flips["augmented"] <= flips["planted"] / 2
    # accuracy on the task itself (sentiment rows without gender words) costs at most one point
    assert (
        accuracy(world["augmented"], world["sentiment"])
        >= accuracy(world["planted"], world["sentiment"]) - 0.01
    )


def test_an_absent_attribute_reports_no_rows_and_no_flip_rate(world: dict[str, Path], capsys) -> None:
    report = audit(world["planted"], world["audit_data"], "--attributes", "religion,gender")
    religion = report["attributes"]["religion"]
    assert religion["tested"] == 0 and religion["flip_rate"] is None and religion["mean_abs_delta_p"] is None
    assert (
        "religion: no row mentions a term of its lexicon (0 rows tested); no flip rate"
        in capsys.readouterr().out
    )


def test_report_files_groups_and_invariance(world: dict[str, Path]) -> None:
    rng = random.Random(3)
    rows = [(f"{rng.choice(['john', 'mary'])} in {rng.choice(['london', 'paris'])} {text}", label)
            for text, label in sentiment_rows(40, rng)]  # fmt: skip
    groups = ["a" if i < 10 else "b" for i in range(40)]
    data = write(world["tmp"] / "grouped.csv", rows, groups)
    out = world["tmp"] / "grouped-audit"
    assert main(["audit", str(world["control"]), "--data", str(data), "--group-column", "group",
                 "--output", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "audit.json").read_text())
    assert set(report["attributes"]) == {"gender", "nationality", "religion", "age"}
    assert report["attributes"]["gender"]["tested"] == 40  # every row has john or mary
    assert set(report["attributes"]["gender"]) >= {"flip_rate", "flip_rate_ci", "mean_abs_delta_p",
                                                   "mean_abs_delta_p_ci", "worst", "counterfactuals"}  # fmt: skip
    assert {k: v["tested"] for k, v in report["invariance"].items()} == {
        "typos": 40,
        "names": 40,
        "locations": 40,
    }
    from multitune.api import load

    predicted = load(world["control"]).predict([t for t, _ in rows])
    right = [p == label for p, (_, label) in zip(predicted, rows, strict=True)]
    assert report["groups"]["groups"]["a"]["accuracy"] == pytest.approx(sum(right[:10]) / 10)
    assert report["groups"]["groups"]["b"]["error_rate"] == pytest.approx(1 - sum(right[10:]) / 30)
    page = (out / "audit.html").read_text()
    assert "<table class='attributes'>" in page and "<td>religion (no term in the data)</td>" in page
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--attributes", "gender,colour"], "unknown attribute 'colour'"),
        (["--text-column", "review"], "column 'review' not found"),
        (["--group-column", "region"], "--group-column 'region' not found"),
        (["--language", "fr"], "--language 'fr'"),
        (["--lexicon", "ONE_COLUMN"], "must have two columns, term,counterpart"),
        (["--data", "MISSING"], "missing.csv"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(
    world: dict[str, Path], capsys, flags: list[str], needle: str
) -> None:
    one = world["tmp"] / "one.csv"
    one.write_text("he\nshe\n")
    flags = [str(one) if f == "ONE_COLUMN" else str(world["tmp"] / "missing.csv") if f == "MISSING" else f
             for f in flags]  # fmt: skip
    data = [] if "--data" in flags else ["--data", str(world["audit_data"])]
    capsys.readouterr()
    assert main(["audit", str(world["control"]), *data, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_augment_adds_each_counterfactual_with_its_label() -> None:
    from multitune.data import Example
    from multitune.risks.augment import augment

    rows = [Example(text="he is good", label="pos"), Example(text="the film", label="neg")]
    out = augment(rows, [builtin("gender")])
    assert out == [*rows, Example(text="she is good", label="pos")]


def test_generation_task_reports_the_change_in_response_log_probability(tmp_path: Path, capsys) -> None:
    model = str(save_gendered(tmp_path / "llama", "llama"))
    rng = random.Random(1)
    data = tmp_path / "gen.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        for i in range(24):
            word = rng.choice(POSITIVE + NEGATIVE)
            gender = "he" if i % 2 else "she"
            writer.writerow(
                [f"{gender} said the movie was {word}", "it is good" if word in POSITIVE else "it is bad"]
            )
    run = tmp_path / "gen"
    assert main(["train", "--model", model, "--kind", "generation", "--data", str(data), "--output", str(run),
                 "--epochs", "1", "--max-length", "16", "--quiet"]) == 0  # fmt: skip
    out = tmp_path / "gen-audit"
    assert (
        main(["audit", str(run), "--data", str(data), "--attributes", "gender,age", "--output", str(out)])
        == 0
    )
    report = json.loads((out / "audit.json").read_text())
    gender, age = report["attributes"]["gender"], report["attributes"]["age"]
    assert report["kind"] == "generation" and gender["tested"] == 24 and gender["mean_abs_delta_logp"] > 0
    low, high = gender["mean_delta_logp_ci"]
    assert low <= gender["mean_delta_logp"] <= high
    assert age["tested"] == 0 and age["mean_delta_logp"] is None
    assert "change in response log-prob" in (out / "audit.html").read_text()
    assert "gender: 24 rows tested, change in response log-probability" in capsys.readouterr().out
    prompts_only = tmp_path / "prompts.csv"
    prompts_only.write_text("prompt\nhe said so\n")
    assert main(["audit", str(run), "--data", str(prompts_only), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--response-column" in err


def test_train_counterfactual_augment_bad_inputs_are_one_line(world: dict[str, Path], capsys) -> None:
    one = world["tmp"] / "one-column.csv"
    one.write_text("he\nshe\n")
    for flags, needle in [
        (["--counterfactual-attributes", "colour"], "unknown attribute 'colour'"),
        (["--counterfactual-lexicon", str(one)], "must have two columns"),
        (["--counterfactual-language", "fr"], "language 'fr'"),
    ]:
        capsys.readouterr()
        code = main(["train", "--model", str(world["model"]), "--data", str(world["tmp"] / "planted.csv"),
                     "--output", str(world["tmp"] / "refused"), "--counterfactual-augment", *flags, "--quiet"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err
        assert not (world["tmp"] / "refused" / "adapter").exists()
