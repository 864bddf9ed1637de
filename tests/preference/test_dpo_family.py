"""The DPO family (`dpo --loss sigmoid|ipo|hinge|simpo|orpo`): each loss equals its formula on fixed
log-probabilities, the reference-free ones compute no reference, and each trains a tiny policy from the CLI
until its held-out preference accuracy beats chance."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_preference import TRAIN_FLAGS, _parse, pair_files  # noqa: F401  (a fixture)

from multitune.errors import ConfigError
from multitune.preference.cli import add_dpo_arguments, cmd_dpo
from multitune.preference.dpo import LOSSES, preference_loss

POLICY = torch.tensor([[-4.0, -9.0], [-6.0, -5.0], [-3.0, -3.5]])  # (chosen, rejected) summed log-probs
REFERENCE = torch.tensor([[-5.0, -8.0], [-6.5, -5.5], [-3.2, -3.0]])
LENGTHS = torch.tensor([[4.0, 6.0], [3.0, 5.0], [2.0, 2.0]])
BETA = 0.3


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def by_hand(loss: str) -> tuple[list[float], list[float]]:
    """Each pair's loss and margin, written out from the papers' formulas (TRL's forms)."""
    losses, margins = [], []
    for (pc, pr), (rc, rr), (lc, lr) in zip(
        POLICY.tolist(), REFERENCE.tolist(), LENGTHS.tolist(), strict=True
    ):
        if loss in ("sigmoid", "hinge"):
            m = BETA * ((pc - rc) - (pr - rr))
            losses.append(-math.log(sigmoid(m)) if loss == "sigmoid" else max(0.0, 1 - m))
        elif loss == "ipo":
            m = (pc - rc) / lc - (pr - rr) / lr
            losses.append((m - 1 / (2 * BETA)) ** 2)
        elif loss == "simpo":
            m = BETA * (pc / lc - pr / lr) - 0.4
            losses.append(-math.log(sigmoid(m)))
        else:  # orpo

            def log_odds(mean: float) -> float:
                return mean - math.log(1 - math.exp(mean))

            m = log_odds(pc / lc) - log_odds(pr / lr)
            losses.append(-pc / lc - BETA * math.log(sigmoid(m)))
        margins.append(m)
    return losses, margins


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_equals_its_formula(loss: str) -> None:
    value, margins = preference_loss(loss, POLICY, REFERENCE, LENGTHS, BETA, gamma=0.4)
    losses, expected = by_hand(loss)
    assert float(value) == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert margins.tolist() == pytest.approx(expected, abs=1e-6)


def test_reference_free_losses_ignore_the_reference_and_an_unknown_loss_is_refused() -> None:
    for loss in ("simpo", "orpo"):
        a = preference_loss(loss, POLICY, None, LENGTHS, BETA)[0]
        b = preference_loss(loss, POLICY, REFERENCE * 7, LENGTHS, BETA)[0]
        assert float(a) == float(b)
    with pytest.raises(ConfigError, match="--loss must be one of sigmoid, ipo, hinge, simpo, orpo"):
        preference_loss("kto", POLICY, REFERENCE, LENGTHS, BETA)


@pytest.mark.parametrize(
    ("loss", "beta"), [("ipo", "0.5"), ("hinge", "0.5"), ("simpo", "2.0"), ("orpo", "0.5")]
)
def test_each_loss_trains_a_policy_from_the_cli(loss, beta, llama_dir, pair_files, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / loss
    argv = ["--data", pair_files[0], "--model", str(llama_dir), "--validation-ratio", "0.25", "--beta", beta,
            "--loss", loss, "--lora-rank", "4", "--lora-target-modules", "all-linear", "--output", str(out),
            *TRAIN_FLAGS]  # fmt: skip
    cmd_dpo(_parse(add_dpo_arguments, argv))
    result = json.loads((out / "result.json").read_text())
    assert result["loss"] == loss
    assert result["reference"] == (None if loss in ("simpo", "orpo") else "disabled")
    assert result["preference_accuracy"]["after"] > 0.7, result["preference_accuracy"]
    assert json.loads((out / "adapter" / "adapter.json").read_text())["dpo"]["loss"] == loss
    name = {"ipo": "IPO", "hinge": "SLiC's hinge", "simpo": "SimPO", "orpo": "ORPO"}[loss]
    assert f"with {name} (beta {float(beta)})" in capsys.readouterr().out
