"""General-text perplexity: the base's equals the HF model's own NLL, an adapter that changes nothing changes
nothing, routed tasks and the bare base are told apart, encoders are refused; the sample and the files read."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb, tiny_base

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError, DataError
from multitune.health.general import GENERAL_SAMPLE, general_perplexity, read_general
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompt import PromptConfig

# in the tiny tokenizer's vocabulary, of different lengths (padding inside a batch), one longer than max_length
TEXTS = [
    "the movie was very good",
    "it is bad",
    "what a great film and the food was really nice but the service was awful so it is not quite fine",
    "why",
    "this place is terrible",
]
MAX_LENGTH = 12


def _direct_perplexity(bank: MultiTaskModel, texts: list[str], max_length: int) -> float:
    """exp(mean token NLL) from the HF model's logits, one text at a time, no padding, no multitune code."""
    model, tokenizer = bank.base.model, bank.base.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            if bank.base.arch == "seq2seq":
                target = torch.tensor(
                    [tokenizer(text_target=text, truncation=True, max_length=max_length).input_ids]
                )
                source = torch.tensor([tokenizer("").input_ids])
                logits = model(input_ids=source, labels=target).logits[0]
                gold = target[0]
            else:
                ids = torch.tensor([tokenizer(text, truncation=True, max_length=max_length).input_ids])
                logits, gold = model(input_ids=ids).logits[0, :-1], ids[0, 1:]
            total += float(F.cross_entropy(logits.float(), gold, reduction="sum"))
            count += gold.numel()
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_the_base_perplexity_is_exp_of_the_mean_token_nll_of_the_model(family: str, one_thread) -> None:
    bank = MultiTaskModel(tiny_base(family))
    expected = _direct_perplexity(bank, TEXTS, MAX_LENGTH)
    got = general_perplexity(bank, None, TEXTS, max_length=MAX_LENGTH, batch_size=2)  # padded batches
    assert got == pytest.approx(expected, rel=1e-5)
    # a task in the bank: None is still the bare base (its adapter off); the task itself differs once trained
    bank.add_task("gen", "generation", "lora", LoRAConfig(rank=2))
    perturb(bank, "gen", 0, scale=1.0)
    assert general_perplexity(bank, None, TEXTS, max_length=MAX_LENGTH) == pytest.approx(expected, rel=1e-5)
    assert general_perplexity(bank, "gen", TEXTS, max_length=MAX_LENGTH) != pytest.approx(expected, rel=1e-3)
    assert not bank.routing.disabled and not bank.training  # the bank is left as it was


def test_a_zero_initialised_lora_gives_the_base_perplexity_and_each_task_is_routed(one_thread) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    base = general_perplexity(bank, None, TEXTS)
    bank.add_task("fresh", "generation", "lora", LoRAConfig(rank=4))  # B = 0: the base's function exactly
    bank.add_task("moved", "generation", "lora", LoRAConfig(rank=4))
    perturb(bank, "moved", 1, scale=1.0)
    bank.add_task("prompted", "generation", "prompt", PromptConfig(num_virtual_tokens=3))
    bank.train()
    assert general_perplexity(bank, "fresh", TEXTS) == pytest.approx(base, rel=1e-6)
    moved, prompted = general_perplexity(bank, "moved", TEXTS), general_perplexity(bank, "prompted", TEXTS)
    assert math.isfinite(moved) and moved != pytest.approx(base, rel=1e-3)
    assert math.isfinite(prompted) and prompted != pytest.approx(
        base, rel=1e-3
    )  # the soft prompt is routed in
    assert bank.training  # the mode is restored


def test_the_built_in_sample_scores_on_a_decoder(one_thread) -> None:
    bank = MultiTaskModel(tiny_base("gpt2"))
    assert 1.0 < general_perplexity(bank, None, GENERAL_SAMPLE, max_length=64) < float("inf")


def test_an_encoder_is_refused_in_one_line() -> None:
    bank = MultiTaskModel(tiny_base("bert"))
    with pytest.raises(ConfigError, match="encoder") as error:
        general_perplexity(bank, None, TEXTS)
    assert "\n" not in str(error.value) and "decoder" in str(error.value)


def test_the_base_of_a_fully_fine_tuned_bank_is_refused_but_its_task_is_scored(one_thread) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("whole", "generation", "full")
    with pytest.raises(ConfigError, match="'whole' owns this bank's base weights"):
        general_perplexity(bank, None, TEXTS)
    assert math.isfinite(general_perplexity(bank, "whole", TEXTS))


def test_nothing_to_score_and_an_unknown_task_are_one_line_errors() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match="no general text to score"):
        general_perplexity(bank, None, ["", ""])  # [BOS] alone: nothing after the first token
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        general_perplexity(bank, "nope", TEXTS)


# ---- the sample and the files -----------------------------------------------------------------------------
def test_the_built_in_sample_is_forty_distinct_paragraphs() -> None:
    assert read_general(None) == GENERAL_SAMPLE and read_general(None) is not GENERAL_SAMPLE  # a copy
    assert len(GENERAL_SAMPLE) == 40 and len(set(GENERAL_SAMPLE)) == 40
    assert all(len(text.split()) >= 20 for text in GENERAL_SAMPLE)


def test_a_text_file_is_one_text_per_block_or_per_line(tmp_path) -> None:
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("First paragraph,\nwrapped.\n\n\nSecond one.\r\n\r\nThird.\n", encoding="utf-8")
    assert read_general(blocks) == ["First paragraph,\nwrapped.", "Second one.", "Third."]
    lines = tmp_path / "lines.md"  # any extension that is not a table is plain text
    lines.write_bytes(b"\xef\xbb\xbfone line\n  two  \nthree\n\n")
    assert read_general(lines) == ["one line", "two", "three"]


def test_a_table_gives_its_text_column(tmp_path) -> None:
    table = tmp_path / "general.csv"
    table.write_text('id,text\n1,"Hello, world."\n2,\n3,Another one.\n', encoding="utf-8")
    assert read_general(table) == ["Hello, world.", "Another one."]
    lines = tmp_path / "general.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(["a b", "c d"])) + "\n")
    assert read_general(lines) == ["a b", "c d"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"\n  \n\n", "holds no general text"),
        ("binary.txt", b"abc\x00def", "looks binary"),
        ("latin.txt", "caf\xe9\n".encode("latin-1"), "not valid UTF-8"),
        ("columns.csv", b"prompt,response\nhi,there\n", "no 'text' column .*columns: prompt, response"),
        ("blank.csv", b"text,id\n  ,1\n,2\n", "holds no general text"),
        ("broken.jsonl", b'{"text": "fine"}\n{oops\n', "line 2"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name: str, content: bytes | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as error:
        read_general(path)
    assert "\n" not in str(error.value)


def test_a_directory_is_refused(tmp_path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        read_general(tmp_path)
