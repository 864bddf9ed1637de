"""Data loading: every format, column detection, every user mistake's message, and deterministic splits."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multitune.data import Columns, Example, label_set, load_examples, prepare_splits, split_examples
from multitune.errors import ConfigError, DataError
from multitune.tables import read_table

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

ROWS = [
    {"text": "good, very good", "label": "pos"},
    {"text": 'she said "bad"', "label": "neg"},
    {"text": "fine; okay", "label": "pos"},
    {"text": "émigré café ✓", "label": "neg"},
]


def write(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    """Write ``rows`` in the format named by ``fmt`` (default: the extension)."""
    fmt = fmt or path.suffix.lower().lstrip(".")
    names = list(dict.fromkeys(k for r in rows for k in r))
    if fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            writer.writerows([[r.get(n, "") for n in names] for r in rows])
    elif fmt == "tsv":  # the IANA way: no quoting at all
        lines = ["\t".join(names)] + ["\t".join(str(r.get(n, "")) for n in names) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt in ("jsonl", "ndjson"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(fmt)
    return path


def error(exc_type: type[Exception], fn, *args, **kwargs) -> str:
    """The message of the expected error; every user-facing message must be exactly one line."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def labelled(counts: dict[str, int]) -> list[Example]:
    return [Example(text=f"{lab}-{i}", label=lab) for lab, n in counts.items() for i in range(n)]


# ---- formats ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.json", "d.jsonl", "d.ndjson", "d.parquet", "D.CSV"])
def test_every_format_reads_the_same_rows(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, ROWS)
    assert read_table(path) == ROWS
    examples = load_examples(path, "classification")
    assert [(e.text, e.label) for e in examples] == [(r["text"], r["label"]) for r in ROWS]


def test_json_object_wrapping_the_rows_and_utf8_bom(tmp_path: Path) -> None:
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 2, "data": ROWS}))
    assert read_table(wrapped) == ROWS
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbftext,label\nhello,a\n")
    assert read_table(bom) == [{"text": "hello", "label": "a"}]


def test_csv_quoted_commas_newlines_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b'text,label\r\n"one, two\r\nthree",x\r\nplain,y\r\n\r\n')
    assert read_table(path) == [{"text": "one, two\r\nthree", "label": "x"}, {"text": "plain", "label": "y"}]


def test_tsv_quotes_are_literal(tmp_path: Path) -> None:
    # SMS Spam style: a text that starts with a quote must not swallow the following lines.
    path = tmp_path / "s.tsv"
    path.write_text('Label\tSMS\nham\t"quoted start but no end\nspam\tnext row\n')
    examples = load_examples(path, "classification")
    assert [(e.label, e.text) for e in examples] == [
        ("ham", '"quoted start but no end'),
        ("spam", "next row"),
    ]


# ---- columns ------------------------------------------------------------------------------------------
def test_auto_detection_is_case_insensitive_and_prefers_the_first_candidate(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.jsonl",
        [
            {"id": 1, "Sentence": "s1", "Text": "t1", "Sentiment": "p"},
            {"id": 2, "Sentence": "s2", "Text": "t2", "Sentiment": "n"},
        ],
    )
    examples = load_examples(path, "classification")
    assert [(e.text, e.label) for e in examples] == [("t1", "p"), ("t2", "n")]
    assert all(e.text_pair is None and e.response is None for e in examples)


def test_explicit_columns_and_text_pair(tmp_path: Path) -> None:
    row = {"premise": "a dog", "hypothesis": "an animal", "gold": "entail", "text": "x"}
    path = write(tmp_path / "nli.csv", [row])
    columns = Columns(text="premise", text_pair="HYPOTHESIS", label="gold")  # explicit names match any case
    [ex] = load_examples(path, "classification", columns)
    assert ex == Example(text="a dog", text_pair="an animal", label="entail")


def test_int_labels_become_strings_and_sort_numerically(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 1.0, 0, 2])]
    examples = load_examples(write(tmp_path / "n.jsonl", rows), "classification")
    assert [e.label for e in examples] == ["10", "2", "1", "0", "2"]
    assert label_set(examples) == ["0", "1", "2", "10"]
    assert label_set(labelled({"b": 1, "a": 1, "10": 1})) == ["10", "a", "b"]  # mixed: lexicographic
    bools = load_examples(write(tmp_path / "b.json", [{"text": "x", "label": True}]), "classification")
    assert bools[0].label == "True"


def test_generation_alpaca_shape(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Echo.", "input": "   ", "output": "ok"},
    ]
    examples = load_examples(write(tmp_path / "alpaca.json", rows), "generation")
    assert examples == [
        Example(text="Add.\n\n2 and 3", response="5"),
        Example(text="Say hi.", response="hi"),
        Example(text="Echo.", response="ok"),
    ]


def test_generation_without_input_column_and_explicit_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "g.csv", [{"prompt": "Q?", "completion": "A.", "src": "ctx"}])
    assert load_examples(path, "generation") == [Example(text="Q?", response="A.")]
    [ex] = load_examples(path, "generation", Columns(prompt="prompt", input="src", response="completion"))
    assert ex == Example(text="Q?\n\nctx", response="A.")


# ---- every user mistake -------------------------------------------------------------------------------
def test_missing_file_directory_and_unknown_extension(tmp_path: Path) -> None:
    msg = error(DataError, read_table, tmp_path / "nope.csv")
    assert "nope.csv" in msg and "does not exist" in msg
    folder = tmp_path / "data.csv"
    folder.mkdir()
    write(folder / "inner.jsonl", ROWS)
    msg = error(DataError, read_table, folder)
    assert "is a directory" in msg and "inner.jsonl" in msg
    msg = error(DataError, read_table, tmp_path / "book.xlsx")
    assert "book.xlsx" in msg and ".csv" in msg and ".parquet" in msg and ".jsonl" in msg


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("zero.csv", b""),
        ("blank.tsv", b"  \n\n"),
        ("header.csv", b"text,label\n"),
        ("header_blank.csv", b"text,label\n\n,\n"),
        ("list.json", b"[]"),
        ("wrapped.json", b'{"data": []}'),
        ("lines.jsonl", b"\n\n"),
        ("zero.parquet", b""),
    ],
)
def test_empty_files(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    msg = error(DataError, load_examples, path, "classification")
    assert name in msg and "empty" in msg


def test_parquet_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path)
    assert "empty" in error(DataError, read_table, path)


def test_missing_columns_name_the_flag_and_list_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", [{"sentence": "s", "label": "a"}])
    msg = error(DataError, load_examples, path, "classification", Columns(text="review"))
    expected = f"column 'review' not found in {path}; columns found: sentence, label. Pass --text-column NAME"
    assert msg == expected
    msg = error(DataError, load_examples, path, "classification", Columns(text_pair="other"))
    assert "--text-pair-column" in msg
    nolabel = write(tmp_path / "nolabel.csv", [{"body": "x", "y": "1"}])
    msg = error(DataError, load_examples, nolabel, "classification")
    assert "--text-column" in msg and "--label-column" in msg and "columns found: body, y" in msg
    gen = write(tmp_path / "gen.jsonl", [{"instruction": "x", "reply": "y"}])
    msg = error(DataError, load_examples, gen, "generation")
    assert "no response column" in msg and "--response-column" in msg and "reply" in msg
    assert "--input-column" in error(DataError, load_examples, gen, "generation", Columns(input="ctx"))
    assert "--prompt-column" in error(DataError, load_examples, gen, "generation", Columns(prompt="q"))


def test_columns_of_the_other_kind_or_used_twice_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", ROWS)
    msg = error(ConfigError, load_examples, path, "classification", Columns(prompt="text"))
    assert "--prompt-column" in msg
    assert "--label-column" in error(ConfigError, load_examples, path, "generation", Columns(label="label"))
    msg = error(DataError, load_examples, path, "classification", Columns(text="text", label="text"))
    assert "'text'" in msg and "both" in msg
    assert "'regression'" in error(ConfigError, load_examples, path, "regression")


def test_empty_texts_and_labels_are_counted_and_located(tmp_path: Path) -> None:
    rows = [
        {"text": "ok", "label": "a"},
        {"text": "  ", "label": "b"},
        {"text": "x", "label": ""},
        {"text": "", "label": "a"},
        {"text": "y", "label": "b"},
    ]
    path = write(tmp_path / "holes.csv", rows)
    msg = error(DataError, load_examples, path, "classification")
    assert "holes.csv" in msg and "2 rows have an empty 'text' (rows 2, 4)" in msg
    assert "1 rows have an empty 'label' (rows 3)" in msg and "--drop-empty" in msg
    kept = load_examples(path, "classification", drop_empty=True)
    assert [(e.text, e.label) for e in kept] == [("ok", "a"), ("y", "b")]


def test_empty_responses_and_all_empty_after_dropping(tmp_path: Path) -> None:
    gen = write(tmp_path / "g.jsonl", [{"prompt": "p", "response": None}, {"prompt": "q", "response": "r"}])
    assert "'response' (rows 1)" in error(DataError, load_examples, gen, "generation")
    assert load_examples(gen, "generation", drop_empty=True) == [Example(text="q", response="r")]
    hollow = write(tmp_path / "hollow.csv", [{"text": "", "label": "a"}, {"text": " ", "label": "b"}])
    msg = error(DataError, load_examples, hollow, "classification", drop_empty=True)
    assert "all 2 rows" in msg and "hollow.csv" in msg


def test_many_empty_rows_list_only_the_first_few(tmp_path: Path) -> None:
    path = write(tmp_path / "many.jsonl", [{"text": "", "label": "a"}] * 9 + [{"text": "t", "label": "a"}])
    msg = error(DataError, load_examples, path, "classification")
    assert "9 rows" in msg and "rows 1, 2, 3, 4, 5, ..." in msg and "6" not in msg.split("rows 1")[1]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "bad.csv",
            b"text,label\nok,a\n" + b"x" * 105 + b"\xff,b\n",
            ["bad.csv is not valid UTF-8 (byte 0xff at offset 121)", "re-save it as UTF-8"],
        ),
        ("bom_bad.csv", b"\xef\xbb\xbftext\n\xc3(", ["byte 0xc3 at offset 8"]),
        ("utf16.csv", "text,label\nx,y\n".encode("utf-16"), ["UTF-16", "re-save it as UTF-8"]),
        (
            "csv.json",
            b"text,label\nhello,a\n",
            ["csv.json is not valid JSON", "line 1 column 1", "rename it to .csv"],
        ),
        (
            "lines.json",
            b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n',
            ["rename it to .jsonl"],
        ),
        ("scalar.json", b'"just a string"', ["holds a JSON str", "array of row objects"]),
        ("two.json", b'{"train": [], "test": []}', ["keys train, test", "exactly one list"]),
        ("rows.json", b'[{"text": "a", "label": "x"}, [1, 2]]', ["row 2 of", "is a list, not an object"]),
        (
            "badline.jsonl",
            b'{"text": "a", "label": "x"}\n\n{"text": "b", label: y}\n',
            ["line 3 of", "badline.jsonl", "not valid JSON"],
        ),
        (
            "array.jsonl",
            b'[{"text": "a", "label": "x"},\n {"text": "b", "label": "y"}]',
            ["line 1 of", "rename it to .json"],
        ),
        (
            "scalar.jsonl",
            b'{"text": "a", "label": "x"}\n42\n',
            ["line 2 of", "holds a number, not an object"],
        ),
        ("fake.parquet", b"text,label\nx,y\n", ["fake.parquet is not a Parquet file", "PAR1"]),
        ("cut.parquet", b"PAR1" + b"\x00" * 20 + b"PAR1", ["cut.parquet cannot be read as Parquet"]),
        ("binary.csv", b"text,label\nab\x00cd,y\n", ["binary.csv looks binary (NUL byte at offset 13)"]),
        ("array.csv", json.dumps(ROWS).encode(), ["array.csv holds JSON, not CSV", "rename it to .json"]),
        ("lines.csv", b'{"text": "a"}\n{"text": "b"}\n', ["holds JSON Lines", "rename it to .jsonl"]),
        (
            "wide.csv",
            b"text,label\nhello, world,a\n",
            ["line 2 of", "3 fields but the header has 2", "quote"],
        ),
        ("nested.json", b'[{"text": ["a", "b"], "label": "x"}]', ["row 1 of", "'text' holds a list"]),
    ],
)
def test_files_that_are_not_what_they_claim(
    tmp_path: Path, name: str, content: bytes, expected: list[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    msg = error(DataError, load_examples, path, "classification")
    for part in expected:
        assert part in msg


def test_parquet_named_as_csv(tmp_path: Path) -> None:
    write(tmp_path / "real.parquet", ROWS)
    (tmp_path / "real.csv").write_bytes((tmp_path / "real.parquet").read_bytes())
    assert "rename it to .parquet" in error(DataError, read_table, tmp_path / "real.csv")


# ---- splitting ----------------------------------------------------------------------------------------
def test_split_is_deterministic_and_seed_dependent() -> None:
    examples = labelled({"a": 40, "b": 25, "c": 15})
    first = split_examples(examples, seed=3)
    assert first == split_examples(examples, seed=3)
    assert first != split_examples(examples, seed=4)
    gen = [Example(text=str(i), response=str(i)) for i in range(50)]
    assert split_examples(gen, seed=1) == split_examples(gen, seed=1) != split_examples(gen, seed=2)


@pytest.mark.parametrize("stratify", [True, False])
def test_split_loses_and_duplicates_nothing(stratify: bool) -> None:
    examples = labelled({"a": 33, "b": 17, "c": 5, "d": 1})
    train, val, test = split_examples(examples, (0.7, 0.2, 0.1), seed=0, stratify=stratify)
    assert collections.Counter(train + val + test) == collections.Counter(examples)
    assert len(set(train + val + test)) == len(examples)


def test_split_is_stratified_and_keeps_every_class_in_train() -> None:
    counts = {"a": 50, "b": 30, "c": 20, "tiny": 2, "solo": 1}
    ratios = (0.6, 0.25, 0.15)
    train, val, test = split_examples(labelled(counts), ratios, seed=7)
    for split, ratio in ((train, ratios[0]), (val, ratios[1]), (test, ratios[2])):
        per_class = collections.Counter(e.label for e in split)
        for label in ("a", "b", "c"):
            assert abs(per_class[label] - counts[label] * ratio) <= 1, (label, ratio, per_class)
    assert {e.label for e in train} == set(counts)
    assert collections.Counter(e.label for e in train)["solo"] == 1


def test_small_classes_stay_in_train_even_when_rounding_would_take_them() -> None:
    # round(1 * 0.6) = 1 and round(3 * 0.6) + round(3 * 0.2) = 3 would leave no 'solo' or 'triple' in train
    train, val, test = split_examples(labelled({"a": 20, "triple": 3, "solo": 1}), (0.2, 0.6, 0.2), seed=0)
    per_class = collections.Counter(e.label for e in train)
    assert per_class["solo"] == 1 and per_class["triple"] == 1
    assert sum(e.label == "triple" for e in val + test) == 2


def test_split_order_is_shuffled_and_zero_validation_is_allowed() -> None:
    train, val, test = split_examples(labelled({"a": 30, "b": 30}), (0.8, 0.0, 0.2), seed=0)
    assert val == [] and len(test) == 12 and len(train) == 48
    assert [e.label for e in train] != sorted(e.label for e in train)  # classes interleaved, not blocked


def test_unstratified_generation_split_sizes() -> None:
    gen = [Example(text=str(i), response="r") for i in range(100)]
    train, val, test = split_examples(gen, (0.8, 0.1, 0.1), seed=0)
    assert (len(train), len(val), len(test)) == (80, 10, 10)


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.2), (1.2, -0.1, -0.1), (0.5, 0.5), (0.8, float("nan"), 0.2)])
def test_bad_ratios(ratios: tuple[float, ...]) -> None:
    msg = error(ConfigError, split_examples, labelled({"a": 5, "b": 5}), ratios)
    assert "sum to 1" in msg and "--split" in msg


# ---- prepare_splits -----------------------------------------------------------------------------------
def many(n: int, labels: tuple[str, ...] = ("neg", "pos")) -> list[dict]:
    return [{"text": f"text {i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_prepare_splits_from_one_file(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 3 * 5} for i in range(90)])
    splits = prepare_splits(path, "classification", seed=1)
    assert splits.labels == ["0", "5", "10"]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (72, 9, 9)
    assert splits == prepare_splits(path, "classification", seed=1)


def test_prepare_splits_with_separate_files(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", many(100))
    test = write(tmp_path / "test.parquet", many(7))
    val = write(tmp_path / "val.json", many(5))
    both = prepare_splits(train, "classification", validation_path=val, test_path=test)
    assert (len(both.train), len(both.validation), len(both.test)) == (100, 5, 7)
    only_test = prepare_splits(train, "classification", test_path=test, ratios=(0.8, 0.1, 0.1))
    # train/validation carved 8:1 from the train file; 100 * 1/9 per class of 50 -> round(5.6) = 6 each
    assert (len(only_test.train), len(only_test.validation), len(only_test.test)) == (88, 12, 7)
    only_val = prepare_splits(train, "classification", validation_path=val, ratios=(0.6, 0.2, 0.2))
    # train/test carved 3:1; 50 per class * 0.25 = 12.5 rounds half up to 13 each
    assert (len(only_val.train), len(only_val.validation), len(only_val.test)) == (74, 5, 26)
    gen_rows = [{"prompt": f"p{i}", "response": "r"} for i in range(100)]
    gen_test = write(tmp_path / "gt.jsonl", gen_rows[:3])
    gen = prepare_splits(write(tmp_path / "g.jsonl", gen_rows), "generation", test_path=gen_test)
    assert (len(gen.train), len(gen.validation), len(gen.test), gen.labels) == (89, 11, 3, [])


def test_unseen_labels_in_a_separate_file(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", many(20))
    val = write(tmp_path / "val.csv", many(6, ("neg", "pos", "meh")) + [{"text": "z", "label": "zzz"}])
    msg = error(DataError, prepare_splits, train, "classification", validation_path=val)
    assert "validation file" in msg and "val.csv" in msg and "2 labels not in the training data" in msg
    assert "'meh', 'zzz'" in msg and "add training examples" in msg


def test_one_label_in_training_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "mono.csv", many(10, ("pos",)))
    msg = error(DataError, prepare_splits, path, "classification")
    assert "mono.csv" in msg and "only one label ('pos')" in msg and "at least two" in msg


def test_max_examples_caps_train_only_and_stays_stratified(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", many(300, ("a", "b", "c")))
    full = prepare_splits(path, "classification", seed=2)
    capped = prepare_splits(path, "classification", seed=2, max_examples=10)
    assert len(capped.train) == 10 and set(capped.train) <= set(full.train)
    assert capped.validation == full.validation and capped.test == full.test
    assert sorted(collections.Counter(e.label for e in capped.train).values()) == [3, 3, 4]
    assert capped == prepare_splits(path, "classification", seed=2, max_examples=10)
    assert prepare_splits(path, "classification", seed=2, max_examples=10_000).train == full.train
    assert "max_examples" in error(ConfigError, prepare_splits, path, "classification", max_examples=0)


def test_max_examples_below_the_number_of_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", many(300, ("a", "b", "c")))
    msg = error(DataError, prepare_splits, path, "classification", max_examples=2)
    assert "validation split of" in msg and "raise --max-examples to at least 3" in msg
    msg = error(DataError, prepare_splits, path, "classification", max_examples=1)
    assert "only one label" in msg and "raise --max-examples to at least 3" in msg


def test_bad_ratios_fail_before_reading(tmp_path: Path) -> None:
    absent = tmp_path / "absent.csv"
    assert "sum to 1" in error(ConfigError, prepare_splits, absent, "classification", ratios=(0.5, 0.5, 0.5))


# ---- the real shared datasets -------------------------------------------------------------------------
real = pytest.mark.skipif(not DATASETS.exists(), reason="shared datasets folder absent (fresh clone)")


@real
@pytest.mark.parametrize(
    ("name", "rows", "labels"),
    [
        ("sst2/train.csv", 6920, ["negative", "positive"]),
        ("trec/train.jsonl", 5452, ["0", "1", "2", "3", "4", "5"]),
        ("sms_spam/SMSSpamCollection.tsv", 5574, ["ham", "spam"]),
    ],
)
def test_real_classification_files(name: str, rows: int, labels: list[str]) -> None:
    examples = load_examples(DATASETS / name, "classification")
    assert len(examples) == rows and label_set(examples) == labels
    splits = prepare_splits(DATASETS / name, "classification")
    assert splits.labels == labels
    assert len(splits.train) + len(splits.validation) + len(splits.test) == rows
    assert abs(len(splits.test) - rows * 0.1) <= len(labels)


@real
def test_real_alpaca_has_two_empty_outputs() -> None:
    path = DATASETS / "alpaca" / "alpaca_5000.json"
    msg = error(DataError, load_examples, path, "generation")
    assert "2 rows have an empty 'output'" in msg and "--drop-empty" in msg
    examples = load_examples(path, "generation", drop_empty=True)
    assert len(examples) == 4998 and all(e.response and e.response.strip() for e in examples)
    assert sum("\n\n" in e.text for e in examples) >= 1900  # about 40% of Alpaca rows carry an input
