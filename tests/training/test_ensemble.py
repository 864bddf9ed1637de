"""Prompt ensembling: members trained from different seeds, one batch for all of them, majority vote."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_base, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods.prompt import PromptConfig
from multitune.methods.prompt import prompts as prompt_of
from multitune.training.ensemble import (
    ensemble_predict,
    ensemble_votes,
    evaluate_ensemble,
    majority_vote,
    train_prompt_ensemble,
)
from multitune.training.evaluate import evaluate, predict_labels


@pytest.fixture(scope="module")
def trained() -> tuple[MultiTaskModel, list[str]]:
    bank = MultiTaskModel(tiny_base("llama"))
    data = toy_sentiment(48)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=3e-2, warmup_ratio=0.0, patience=100)
    members = train_prompt_ensemble(
        bank,
        "sent",
        3,
        ["neg", "pos"],
        data,
        data[:8],
        cfg,
        PromptConfig(num_virtual_tokens=3, init="random"),
    )
    return bank, members


def test_members_differ_and_each_is_a_prompt_task(trained) -> None:
    bank, members = trained
    assert members == ["sent-e0", "sent-e1", "sent-e2"]
    prompts = [prompt_of(bank)[m].detach() for m in members]
    assert not torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[1], prompts[2])


def test_one_batch_votes_equal_each_member_predicting_alone(trained) -> None:
    bank, members = trained
    data = toy_sentiment(20, seed=3)
    votes, _ = ensemble_votes(bank, members, data, batch_size=64)
    for j, member in enumerate(members):
        alone = predict_labels(bank, member, data)
        assert [bank.tasks[member].labels[i] for i in votes[:, j].tolist()] == alone


def test_all_members_run_in_one_forward(trained) -> None:
    bank, members = trained
    calls = []
    handle = bank.base.backbone().register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        ensemble_predict(bank, members, toy_sentiment(10, seed=4), batch_size=64)
    finally:
        handle.remove()
    assert len(calls) == 1  # 10 examples x 3 members = 30 rows, one pass


def test_majority_vote_and_tie_break() -> None:
    votes = torch.tensor([[0, 1, 1], [2, 0, 1], [0, 0, 2]])
    probs = torch.zeros(3, 3, 3)
    probs[1, :, 2] = 0.9  # the three-way tie of row 1 goes to class 2, the most probable on average
    assert majority_vote(votes, probs).tolist() == [1, 2, 0]


def test_evaluate_reports_the_vote_and_every_member(trained) -> None:
    bank, members = trained
    data = toy_sentiment(30, seed=5)
    result = evaluate_ensemble(bank, members, data)
    assert set(result["members"]) == set(members)
    for member in members:
        assert result["members"][member]["accuracy"] == pytest.approx(
            evaluate(bank, member, data)["accuracy"]
        )
    assert 0.0 <= result["accuracy"] <= 1.0 and "macro_f1" in result


def test_bad_ensembles_give_clear_errors(trained) -> None:
    bank, members = trained
    with pytest.raises(ConfigError, match="unknown ensemble member 'nope'"):
        ensemble_predict(bank, [*members, "nope"], toy_sentiment(2))
    bank.add_task("other", "classification", "prompt", PromptConfig(num_virtual_tokens=2), ["a", "b", "c"])
    try:
        with pytest.raises(ConfigError, match="same task"):
            ensemble_predict(bank, [members[0], "other"], toy_sentiment(2))
    finally:
        bank.remove_task("other")
    with pytest.raises(ConfigError, match="at least one member"):
        ensemble_predict(bank, [], toy_sentiment(2))
