"""GRPO and RLOO (multitune.preference.grpo): the advantages and the loss by hand, the loop by its effect on the
tiny Llama (the reward rises, the KL stays bounded), and the CLI end to end with its bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny, tiny_base, tiny_model
from test_ppo import NEW_TOKENS, PROMPTS, positive_fraction

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.preference.grpo import GRPOConfig, group_advantages, grpo_token_loss, train_grpo
from multitune.preference.rewards import reward_from_function


def test_group_advantages_as_a_hand_computation() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 6.0])  # two groups of four
    first, second = [1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 6.0]

    def by_hand(group: list[float], kind: str, scale: bool) -> list[float]:
        mean = sum(group) / len(group)
        if kind == "rloo":
            return [r - (sum(group) - r) / (len(group) - 1) for r in group]
        std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5
        return [(r - mean) / (std + 1e-4) if scale else r - mean for r in group]

    for kind, scale in (("grpo", True), ("grpo", False), ("rloo", True)):
        got = group_advantages(rewards, 4, kind, scale).tolist()
        assert got == pytest.approx(by_hand(first, kind, scale) + by_hand(second, kind, scale), abs=1e-5)
    assert group_advantages(torch.ones(4), 4).abs().max() == 0  # a group that agrees teaches nothing


def test_the_token_loss_as_a_hand_computation() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    old = logp + torch.tensor([[0.1, -0.3, 0.0], [0.0, 0.05, 0.0]])
    ref = logp + torch.tensor([[0.2, 0.0, -0.1], [0.3, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.5, -0.5])
    config = GRPOConfig(kl_coef=0.1, cliprange=0.2, max_new_tokens=3)
    per_token = []
    for b in range(2):
        row = []
        for t in range(3):
            ratio = torch.exp(logp[b, t] - old[b, t])
            clipped = ratio.clamp(0.8, 1.2)
            surrogate = min(float(ratio * adv[b]), float(clipped * adv[b]))
            d = float(ref[b, t] - logp[b, t])
            row.append(-(surrogate - 0.1 * (torch.exp(torch.tensor(d)) - d - 1).item()))
        per_token.append(row)
    grpo = (
        sum(
            sum(r[t] * mask[b, t].item() for t in range(3)) / mask[b].sum().item()
            for b, r in enumerate(per_token)
        )
        / 2
    )
    loss, stats = grpo_token_loss(logp, old, ref, adv, mask, config)
    assert float(loss) == pytest.approx(grpo, abs=1e-6)
    dr = sum(r[t] * mask[b, t].item() for b, r in enumerate(per_token) for t in range(3)) / (2 * 3)
    config.loss = "dr_grpo"
    assert float(grpo_token_loss(logp, old, ref, adv, mask, config)[0]) == pytest.approx(dr, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1 / 5)  # one of the five real tokens left [0.8, 1.2]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_raises_the_reward_while_kl_stays_bounded(advantage: str) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    torch.manual_seed(0)
    bank.add_task("policy", "generation", "lora")
    base = tiny_model("llama").state_dict()
    config = GRPOConfig(
        steps=20,
        batch_size=8,
        group_size=8,
        max_new_tokens=NEW_TOKENS,
        learning_rate=1e-2,
        advantage=advantage,
    )
    history = train_grpo(
        bank, "policy", PROMPTS, reward_from_function(positive_fraction), config, progress=False
    )["history"]
    first = sum(r["score"] for r in history[:4]) / 4
    last = sum(r["score"] for r in history[-4:]) / 4
    assert last > first + 0.1, (first, last)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts as the base: policy == reference
    assert max(r["kl"] for r in history) < 5.0
    after = bank.base.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items() if k in after)  # the base is untouched


def test_grpo_cli_end_to_end_and_bad_inputs(tmp_path, capsys) -> None:
    model = save_tiny("llama", tmp_path / "llama")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:8]))
    (tmp_path / "rewards.py").write_text(
        "from helpers import POSITIVE\n"
        "def positive(prompts, responses):\n    return [sum(w in POSITIVE for w in r.split()) for r in responses]\n"
        "def short(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
    )
    out = tmp_path / "run"
    common = ["grpo", "--model", str(model), "--prompts", str(prompts), "--max-new-tokens", "4", "--quiet"]
    code = main([*common, "--reward-python", f"{tmp_path / 'rewards.py'}:positive", "--steps", "2",
                 "--batch-size", "2", "--group-size", "4", "--output", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["command"] == "grpo" and result["steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "adapter" / "adapter.json").is_file()
    page = (out / "report.html").read_text()  # the run report: its curves, and a row per step
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG") and page.count("<tr>") == 3
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    for extra, expected in (
        (["--group-size", "1"], "group_size must be >= 2"),
        (["--advantage", "mean"], "advantage must be grpo or rloo"),
        (
            ["--reward-python", f"{tmp_path / 'rewards.py'}:short", "--output", str(tmp_path / "s")],
            "the reward function short returned 1 scores for 32 responses",
        ),
        (
            ["--reward-python", f"{tmp_path / 'rewards.py'}:nan", "--output", str(tmp_path / "n")],
            "the reward function nan returned a NaN",
        ),
    ):
        argv = [*common, "--reward-python", f"{tmp_path / 'rewards.py'}:positive", "--output",
                str(tmp_path / "bad"), *extra]  # fmt: skip
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["grpo", "--model", str(model), "--prompts", str(empty), "--reward-python",
                 f"{tmp_path / 'rewards.py'}:positive", "--output", str(tmp_path / "e")]) != 0  # fmt: skip
    assert "prompts" in capsys.readouterr().err
    assert GRPOConfig(steps=0).validate() == ["steps must be >= 1 (got 0); fix --steps"]
