"""Sampled rows of a decode step are drawn together (decode.draw_rows), each from its own seeded stream."""

from __future__ import annotations

import math

import torch

from multitune.serve.decode import Handle, SamplingParams, sample_tokens


def _handle(temperature: float = 1.0, top_p: float = 1.0, seed: int | None = 0) -> Handle:
    params = SamplingParams(max_tokens=10, temperature=temperature, top_p=top_p, seed=seed)
    return Handle("t", "t", [1], params, 1e18, None)


def test_a_seeded_row_draws_the_same_tokens_alone_or_beside_others() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    alone = _handle(seed=11)
    together = [_handle(seed=5, top_p=0.8), _handle(seed=11), _handle(temperature=0.0)]
    seq_alone = [sample_tokens(logits[1:2], [alone])[0] for _ in range(20)]
    seq_together = [sample_tokens(logits, together)[1] for _ in range(20)]
    assert seq_alone == seq_together and len(set(seq_alone)) > 1
    assert {sample_tokens(logits, together)[2] for _ in range(5)} == {int(logits[2].argmax())}  # greedy row


def test_draws_follow_the_tempered_distribution_within_the_nucleus() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    handle = _handle(temperature=0.7, seed=1)
    counts = torch.bincount(
        torch.tensor([sample_tokens(logits, [handle])[0] for _ in range(4000)]), minlength=5
    )
    expected = torch.softmax(logits[0] / 0.7, dim=0) * 4000
    for seen, want in zip(counts.tolist(), expected.tolist(), strict=True):
        assert abs(seen - want) <= 4 * math.sqrt(want) + 2  # four standard deviations
    # top_p 0.8: the nucleus is the smallest head whose mass reaches 0.8 -- tokens 0 and 1 here (0.76 + 0.18)
    nucleus = _handle(temperature=0.7, top_p=0.8, seed=2)
    assert {sample_tokens(logits, [nucleus])[0] for _ in range(500)} == {0, 1}


def test_a_row_with_non_finite_logits_fails_alone() -> None:
    logits = torch.randn(3, 16)
    logits[1, 3] = float("nan")
    handles = [_handle(seed=1), _handle(seed=2), _handle(temperature=0.0)]
    tokens = sample_tokens(logits, handles)
    assert handles[1].done and handles[1].error is not None and "not finite" in str(handles[1].error)
    assert not handles[0].done and not handles[2].done
    assert 0 <= tokens[0] < 16 and tokens[2] == int(logits[2].argmax())


def test_a_nucleus_wider_than_the_candidates_is_drawn_from_in_full() -> None:
    from multitune.serve import decode

    flat = torch.zeros(
        2, 4 * decode.NUCLEUS_CANDIDATES
    )  # every token equally likely: the nucleus is 90% of them
    flat[1, 0] = 50.0  # one sure token: its nucleus is that token, found among the candidates
    handles = [_handle(top_p=0.9, seed=4), _handle(top_p=0.9, seed=5)]
    seen = [sample_tokens(flat, handles) for _ in range(300)]
    assert max(row[0] for row in seen) >= decode.NUCLEUS_CANDIDATES  # beyond the first 256
    assert {row[1] for row in seen} == {0}
