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


# ---- KTO ------------------------------------------------------------------------------------------------
def test_kto_loss_equals_its_formula() -> None:
    from multitune.preference.kto import kto_loss

    policy, reference = torch.tensor([-3.0, -5.0, -4.0]), torch.tensor([-3.5, -4.0, -4.2])
    desirable = torch.tensor([True, False, True])
    kl_policy, kl_reference = torch.tensor([-6.0, -7.0, -5.0]), torch.tensor([-6.3, -7.1, -5.5])
    value, margins, z0 = kto_loss(policy, reference, desirable, kl_policy, kl_reference, 0.5, 1.0, 1.5)
    z = max(0.0, ((-6.0 + 6.3) + (-7.0 + 7.1) + (-5.0 + 5.5)) / 3)
    rewards = [0.5, -1.0, 0.2]
    by_hand = [
        1.0 * (1 - sigmoid(0.5 * (rewards[0] - z))),
        1.5 * (1 - sigmoid(0.5 * (z - rewards[1]))),
        1.0 * (1 - sigmoid(0.5 * (rewards[2] - z))),
    ]
    assert float(z0) == pytest.approx(z, abs=1e-6)
    assert float(value) == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    assert margins.tolist() == pytest.approx([0.5 * (0.5 - z), 0.5 * (z + 1.0), 0.5 * (0.2 - z)], abs=1e-6)
    # z0 is clamped at 0 and carries no gradient
    _, _, zero = kto_loss(policy, reference, desirable, kl_reference, kl_policy, 0.5)
    assert float(zero) == 0.0


def test_kto_trains_on_unpaired_rows_from_the_cli_and_bad_rows_are_one_line(
    llama_dir, tmp_path, capsys
) -> None:
    from test_preference import toy_pairs, write_jsonl

    from multitune.errors import DataError
    from multitune.preference.cli import add_kto_arguments, cmd_kto
    from multitune.preference.kto import load_unpaired

    rows = []
    for i, pair in enumerate(toy_pairs(48, 0)):  # each pair as one unpaired row: thumbs up or down
        good = i % 2 == 0
        rows.append(
            {"prompt": pair.prompt, "completion": pair.chosen if good else pair.rejected, "label": good}
        )
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "kto"
    argv = ["--data", data, "--model", str(llama_dir), "--validation-ratio", "0.25", "--beta", "0.5",
            "--lora-rank", "4", "--lora-target-modules", "all-linear", "--output", str(out), *TRAIN_FLAGS]  # fmt: skip
    summary = cmd_kto(_parse(add_kto_arguments, argv))
    result = json.loads((out / "result.json").read_text())
    assert result == summary and result["command"] == "kto"
    assert result["accuracy"]["after"] > result["accuracy"]["before"] and result["accuracy"]["after"] >= 0.75
    assert result["rows"]["desirable"] + result["rows"]["undesirable"] == result["rows"]["train"] == 36
    assert "with KTO (beta 0.5)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    for text, expected in (
        ('{"prompt": "a", "completion": "b"}\n', "line 1 of .* lacks 'label'"),
        ('{"prompt": "a", "completion": "b", "label": "maybe"}\n', "'label' is 'maybe'; give true or false"),
        ('{"prompt": "a", "completion": "", "label": true}\n', "the completion is empty; .* --drop-empty"),
    ):
        bad.write_text(text)
        with pytest.raises(DataError, match=expected):
            load_unpaired(bad)
    assert [r.desirable for r in load_unpaired(write_jsonl(tmp_path / "ok.jsonl", [
        {"prompt": "a", "response": "b", "label": "false"}, {"prompt": "a", "completion": "c", "label": 1}]))] == [False, True]  # fmt: skip
