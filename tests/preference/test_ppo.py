"""PPO (multitune.preference.ppo) on the tiny Llama: the pieces by hand, the loop by its effect, the CLI end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from helpers import POSITIVE, WORDS, perturb, tiny_base, tiny_model

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.preference.ppo import (
    AdaptiveKLController,
    PPOConfig,
    RunningMoments,
    gae,
    load_value_head,
    response_mask,
    response_outputs,
    train_ppo,
    whiten,
)
from multitune.preference.ppo_cli import add_ppo_arguments, cmd_ppo
from multitune.preference.rewards import reward_from_classifier, reward_from_function
from multitune.storage import load_adapter, save_adapter

FILLER = WORDS[13:]
PROMPTS = [" ".join(FILLER[(i * 7 + j) % len(FILLER)] for j in range(3)) for i in range(32)]
NEW_TOKENS = 6


def positive_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """The toy reward: the share of the response's slots filled with positive words (0..1)."""
    return [sum(w in POSITIVE for w in r.split()) / NEW_TOKENS for r in responses]


def fast_config(**overrides) -> PPOConfig:
    settings = dict(
        steps=30,
        batch_size=64,
        minibatch_size=32,
        ppo_epochs=4,
        max_new_tokens=NEW_TOKENS,
        learning_rate=5e-3,
        init_kl_coef=0.05,
        seed=0,
    )
    settings.update(overrides)
    return PPOConfig(**settings)


def policy_bank(method: str = "lora") -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base("llama"))
    torch.manual_seed(0)
    bank.add_task("policy", "generation", method)
    return bank


def base_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def bank_logits(bank: MultiTaskModel, ids: torch.Tensor, disabled: bool) -> torch.Tensor:
    task_ids = bank.task_ids("policy", ids.shape[0])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if disabled:
            with bank.disabled(), bank.routed(task_ids):
                inputs, width = bank.model_inputs(ids, mask, task_ids)
                return bank.base.model(**inputs).logits[:, width:]
        with bank.routed(task_ids):
            inputs, width = bank.model_inputs(ids, mask, task_ids)
            return bank.base.model(**inputs).logits[:, width:]


pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([[2, 25, 18, 5, 30, 31], [2, 7, 7, 9, 12, 40]])


# ---- the pieces ------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d2 = 1 - .5 = .5, A2 = .5; d1 = 0 + .5 - .5 = 0, A1 = .25; d0 = 0, A0 = .125
    # row 1 ends after two tokens (the 9 and the 7 are padding): d1 = 2 - 1 = 1, A1 = 1;
    #        d0 = .5 + 1 - 1 = .5, A0 = .5 + .5 * 1 = 1
    assert torch.allclose(advantages, torch.tensor([[0.125, 0.25, 0.5], [1.0, 1.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.625, 0.75, 1.0], [2.0, 2.0, 0.0]]))
    discounted, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)  # A0 = r0 + g r1 + g^2 r2 - V0
    assert discounted[0, 0].item() == pytest.approx(0.25 - 0.5)
    white = whiten(advantages, mask)
    assert white[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white[1, 2].item() == 0.0


def test_adaptive_kl_controller_moves_toward_the_target():
    up = AdaptiveKLController(0.2, target=6.0, horizon=100)
    assert up.update(12.0, n_steps=10) == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    down = AdaptiveKLController(0.2, target=6.0, horizon=100)
    assert down.update(5.4, n_steps=10) == pytest.approx(0.2 * (1 - 0.1 * 10 / 100))
    for _ in range(50):
        down.update(0.0, n_steps=10)
    assert down.value < 0.2 * 0.5
    assert AdaptiveKLController(0.2, target=0.0, horizon=100).update(50.0, 10) == 0.2  # fixed


def test_response_mask_ends_at_the_first_eos():
    tokens = torch.tensor([[5, 6, 3, 3, 0], [5, 3, 7, 8, 9], [5, 6, 7, 8, 9]])
    assert response_mask(tokens, 3).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize(
    "family", ["llama", "gpt2"]
)  # gpt2: absolute positions, so padding must not shift them
def test_response_outputs_score_what_generate_sampled(family):
    """Greedy tokens are the argmax of the rollout forward: prompt positions and padding line up."""
    from multitune.data import Example
    from multitune.encode import collate, encode_task

    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("policy", "generation", "lora")
    perturb(bank, "policy", 1)
    features = encode_task(
        bank,
        "policy",
        [Example(text=p) for p in ("the movie", "a", "this film is really bad")],
        64,
        with_target=False,
    )
    batch = collate(features, 0, 0, padding_side="left")
    tokens = bank.generate(
        batch["input_ids"],
        batch["attention_mask"],
        batch["task_ids"],
        do_sample=False,
        max_new_tokens=5,
        eos_token_id=3,
    )
    mask = response_mask(tokens, 3)
    ids = torch.cat([batch["input_ids"], torch.where(mask.bool(), tokens, 0)], 1)
    with torch.no_grad():
        logits, _ = response_outputs(
            bank,
            batch["task_ids"],
            ids,
            torch.cat([batch["attention_mask"], mask.long()], 1),
            batch["input_ids"].shape[1],
            1.0,
        )
    assert ((logits.argmax(-1) == tokens) | ~mask.bool()).all()


# ---- the loop ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run():
    bank = policy_bank("lora")
    base_before = {k: v.clone() for k, v in bank.base.model.state_dict().items() if "lora_" not in k}
    task_before = bank.task_state_dict("policy")
    result = train_ppo(
        bank, "policy", PROMPTS, reward_from_function(positive_fraction), fast_config(), progress=False
    )
    return bank, base_before, task_before, result


def test_running_moments_equal_the_moments_of_everything_seen():
    values = torch.tensor([0.2, 0.9, 0.4, 0.7, 1.0, 0.1, 0.55])
    moments = RunningMoments()
    moments.update(values[:3])
    shaped = moments.normalise(values[3:])  # the batch joins the moments first, then is normalised by them
    assert moments.count == 7
    assert moments.mean == pytest.approx(float(values.double().mean()))
    assert moments.std == pytest.approx(float(values.double().std()))
    torch.testing.assert_close(shaped, (values[3:] - values.mean()) / values.std())
    scaled = RunningMoments().normalise(torch.tensor([0.3, 0.4]) * 10)  # the reward's units drop out
    torch.testing.assert_close(scaled, RunningMoments().normalise(torch.tensor([0.3, 0.4])))
    assert RunningMoments().normalise(torch.tensor([0.5])).item() == 0.0  # one value: no spread yet


def test_ppo_raises_the_reward_while_kl_stays_bounded(lora_run):
    _, _, _, result = lora_run
    history = result["history"]
    assert [r["step"] for r in history] == list(range(1, 31))
    first = sum(r["score"] for r in history[:5]) / 5
    last = sum(r["score"] for r in history[-5:]) / 5
    assert last > first + 0.3, (first, last)  # 0.15 -> 0.83 (0.15 -> 0.39 with the raw score, score_norm off)
    assert max(r["kl"] for r in history) < 30.0  # 16.6 at the end, rising about 0.5 per step
    assert history[0]["kl"] == pytest.approx(
        0.0, abs=1e-4
    )  # LoRA starts as the identity: policy == reference
    for key in (
        "reward",
        "kl_coef",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "policy_loss",
        "value_loss",
        "seconds",
    ):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in history), key
    assert any(r["clip_fraction"] > 0 for r in history)
    assert history[-1]["reward"] == pytest.approx(
        history[-1]["score"] - history[-1]["kl_coef"] * history[-1]["kl"], abs=1e-6
    )


def test_ppo_changes_only_the_task_and_the_value_head(lora_run):
    bank, base_before, task_before, result = lora_run
    after = bank.base.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # the base stays bit-identical
    changed = [k for k, v in bank.task_state_dict("policy").items() if not torch.equal(v, task_before[k])]
    assert changed  # the adapter trained
    head = result["value_head"]
    assert head.weight.shape == (1, bank.base.hidden_size)
    assert head.weight.abs().sum() > 0


def test_disabled_adapter_gives_the_original_base_logits_after_ppo(lora_run):
    bank, _, _, _ = lora_run
    fresh = base_logits(tiny_model("llama").eval(), IDS)
    assert torch.allclose(bank_logits(bank, IDS, disabled=True), fresh, atol=1e-6)
    assert not torch.allclose(bank_logits(bank, IDS, disabled=False), fresh, atol=1e-3)  # the policy moved


def test_normalised_scores_make_the_run_blind_to_the_reward_s_units():
    def run(scale: float, norm: bool) -> list[float]:
        def reward(prompts: list[str], responses: list[str]) -> list[float]:
            return [scale * v for v in positive_fraction(prompts, responses)]

        config = fast_config(steps=4, batch_size=32, minibatch_size=16, score_norm=norm)
        result = train_ppo(
            policy_bank(), "policy", PROMPTS, reward_from_function(reward), config, progress=False
        )
        history = result["history"]
        return [r["kl"] for r in history]

    torch.testing.assert_close(run(10.0, True), run(1.0, True), atol=1e-4, rtol=1e-3)
    assert (
        run(10.0, False)[-1] > 1.4 * run(1.0, False)[-1]
    )  # raw scores: ten times the reward, 0.82 against 0.49


def test_the_kl_penalty_holds_the_policy_near_the_reference():
    runs = {}
    for coef in (0.0, 0.5):
        bank = policy_bank()
        config = fast_config(
            steps=12, batch_size=32, minibatch_size=16, learning_rate=1e-2, init_kl_coef=coef
        )
        history = train_ppo(
            bank, "policy", PROMPTS, reward_from_function(positive_fraction), config, progress=False
        )["history"]
        runs[coef] = sum(r["kl"] for r in history[-4:]) / 4
    assert runs[0.5] < 0.5 * runs[0.0], runs  # about 0.7 against 4


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_ppo_with_other_methods(method):
    bank = policy_bank(method)
    before = bank.task_state_dict("policy")
    seen = []
    config = fast_config(steps=4, batch_size=16, minibatch_size=8, ppo_epochs=2, learning_rate=None)
    result = train_ppo(
        bank,
        "policy",
        PROMPTS,
        reward_from_function(positive_fraction),
        config,
        progress=False,
        log=seen.append,
    )
    assert len(seen) == 4 and seen == result["history"]
    assert all(torch.isfinite(torch.tensor([r["kl"], r["value_loss"], r["policy_loss"]])).all() for r in seen)
    assert any(not torch.equal(v, before[k]) for k, v in bank.task_state_dict("policy").items())
    fresh = base_logits(tiny_model("llama").eval(), IDS)
    assert torch.allclose(bank_logits(bank, IDS, disabled=True), fresh, atol=1e-6)


def test_copy_reference_equals_the_disabled_adapter_and_full_needs_it():
    bank = policy_bank()
    perturb(bank, "policy", 2)
    import copy

    reference = copy.deepcopy(bank.base.model)
    ids, mask, task_ids = IDS, torch.ones_like(IDS), bank.task_ids("policy", 2)
    with torch.no_grad(), bank.disabled():
        disabled, _ = response_outputs(bank, task_ids, ids, mask, 3, 1.0)
    with torch.no_grad():
        copied, _ = response_outputs(bank, task_ids, ids, mask, 3, 1.0, model=reference)
        policy, _ = response_outputs(bank, task_ids, ids, mask, 3, 1.0)
    assert torch.allclose(disabled, copied, atol=1e-6)
    assert not torch.allclose(disabled, policy, atol=1e-3)

    full = policy_bank("full")
    reward = reward_from_function(positive_fraction)
    with pytest.raises(ConfigError, match="--reference initial"):
        train_ppo(full, "policy", PROMPTS, reward, fast_config(steps=1), progress=False)
    history = train_ppo(
        full,
        "policy",
        PROMPTS,
        reward,
        fast_config(steps=2, batch_size=8, learning_rate=1e-4, reference="copy"),
        progress=False,
    )["history"]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4) and len(history) == 2
    assert fast_config(reference="copy").reference == "initial"  # PPO's old name is an alias


def test_the_initial_reference_is_the_policy_as_it_starts_for_every_method():
    """A soft prompt is not the identity at its start: 'initial' must be that prompt, not the bare base."""
    reward = reward_from_function(positive_fraction)
    for method in ("prompt", "lora"):
        kls = {}
        for reference in ("disabled", "initial"):
            bank = policy_bank(method)
            perturb(bank, "policy", 3)  # a policy that starts away from the base
            config = fast_config(steps=1, batch_size=8, minibatch_size=8, ppo_epochs=1, reference=reference)
            kls[reference] = train_ppo(bank, "policy", PROMPTS, reward, config, progress=False)["history"][0][
                "kl"
            ]
            assert list(bank.tasks) == ["policy"]  # the frozen twin of the starting policy is gone again
        assert kls["initial"] == pytest.approx(0.0, abs=1e-4) and kls["disabled"] > 1e-2, (method, kls)


def test_policy_checks():
    reward = reward_from_function(positive_fraction)
    bank = policy_bank()
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        train_ppo(bank, "policy", PROMPTS, reward, fast_config(max_new_tokens=0), progress=False)
    with pytest.raises(ConfigError, match="no prompts"):
        train_ppo(bank, "policy", [], reward, fast_config(), progress=False)
    bank.add_task("judge", "classification", "lora", labels=["pos", "neg"])
    with pytest.raises(ConfigError, match="PPO and GRPO train a generation task"):
        train_ppo(bank, "judge", PROMPTS, reward, fast_config(), progress=False)
    t5 = MultiTaskModel(tiny_base("t5"))
    t5.add_task("policy", "generation", "lora")
    with pytest.raises(ConfigError, match="causal LM"):
        train_ppo(t5, "policy", PROMPTS, reward, fast_config(), progress=False)
    prompting = policy_bank("prompting")
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train_ppo(prompting, "policy", PROMPTS, reward, fast_config(), progress=False)


# ---- rewards ---------------------------------------------------------------------------------------
def test_reward_function_is_checked():
    assert reward_from_function(lambda p, r: [len(x) for x in r])(["a", "b"], ["xy", ""]).tolist() == [
        2.0,
        0.0,
    ]
    with pytest.raises(ConfigError, match="returned 1 scores for 2 responses"):
        reward_from_function(lambda p, r: [1.0])(["a", "b"], ["x", "y"])
    with pytest.raises(ConfigError, match="NaN or infinite"):
        reward_from_function(lambda p, r: [float("nan")] * len(r))(["a"], ["x"])
    with pytest.raises(ConfigError, match="must return 1 numbers"):
        reward_from_function(lambda p, r: "high")(["a"], ["x"])


def test_reward_from_classifier_is_a_label_probability_on_the_same_bank():
    from multitune.data import Example
    from multitune.training.evaluate import predict_proba

    bank = policy_bank()
    bank.add_task("judge", "classification", "lora", labels=["neg", "pos"])
    perturb(bank, "judge", 3)
    reward = reward_from_classifier(bank, "judge", "pos")
    responses = ["good great movie", "awful bad", "the film"]
    scores = reward(["a", "b", "c"], responses)
    expected = predict_proba(bank, "judge", [Example(text=r) for r in responses])[:, 1]
    assert torch.allclose(scores, expected, atol=1e-6)
    assert len(set(scores.tolist())) == 3  # the text matters
    paired = reward_from_classifier(bank, "judge", "pos", include_prompt=True)(
        ["good", "bad", "c"], responses
    )
    assert not torch.allclose(paired, scores)
    assert not any(p.requires_grad for p in bank.task_parameters("judge").values())
    with pytest.raises(
        ConfigError, match="label 'maybe' is not a label of task 'judge'; its labels: neg, pos"
    ):
        reward_from_classifier(bank, "judge", "maybe")
    with pytest.raises(ConfigError, match="must be a classification task"):
        reward_from_classifier(bank, "policy", "pos")
    # a short PPO run against it, the judge on the policy's own bank (no second base)
    judge_before = bank.task_state_dict("judge")
    train_ppo(bank, "policy", PROMPTS, reward, fast_config(steps=2, batch_size=8), progress=False)
    assert all(torch.equal(v, judge_before[k]) for k, v in bank.task_state_dict("judge").items())


def test_reward_from_a_trained_reward_model():
    from multitune.preference.rewards import reward_from_model
    from multitune.preference.scoring import add_reward_task, reward_scores

    bank = policy_bank()
    add_reward_task(bank, "rm", "lora", None)
    perturb(bank, "rm", 4)
    reward = reward_from_model(bank, "rm")
    scores = reward(["a", "b"], ["good good", "bad bad"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert torch.allclose(scores, reward_scores(bank, "rm", ["a", "b"], ["good good", "bad bad"]).float())
    history = train_ppo(bank, "policy", PROMPTS, reward, fast_config(steps=2, batch_size=8), progress=False)[
        "history"
    ]
    assert len(history) == 2


# ---- CLI -------------------------------------------------------------------------------------------
REWARD_MODULE = """
def positive(prompts, responses):
    words = {"good", "great", "fine", "nice", "happy", "love", "excellent"}
    return [sum(w in words for w in r.split()) / 6 for r in responses]
"""


def parse(argv: list[str]) -> argparse.Namespace:
    from multitune.flags import parse_args

    parser = argparse.ArgumentParser()
    add_ppo_arguments(parser)
    return parse_args(parser, argv)


@pytest.fixture()
def ppo_inputs(tmp_path, llama_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:12]))
    module = tmp_path / "toy_reward.py"
    module.write_text(REWARD_MODULE)
    return llama_dir, prompts, module


def test_cmd_ppo_end_to_end(ppo_inputs, tmp_path, capsys):
    model, prompts, module = ppo_inputs
    out = tmp_path / "run"
    cmd_ppo(
        parse(
            [
                "--model",
                str(model),
                "--prompts",
                str(prompts),
                "--reward-python",
                f"{module}:positive",
                "--method",
                "lora",
                "--lora-rank",
                "4",
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--minibatch-size",
                "4",
                "--max-new-tokens",
                "5",
                "--learning-rate",
                "0.005",
                "--device",
                "cpu",
                "--output",
                str(out),
                "--quiet",
                "--report-to",
                "tensorboard",
            ]
        )
    )
    printed = capsys.readouterr().out
    assert "step    3/3" in printed and "ppo done: 3 steps" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "report.html",
        "result.json",
        "tensorboard",
        "trackers.json",
        "value_head.safetensors",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/score")] == [1, 2, 3] and "train/kl" in events.Tags()[
        "scalars"
    ]
    assert "Every step (3)" in (out / "report.html").read_text()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2, 3]
    # config.yaml holds the run's settings as `ppo --config` reads them back, the task named after the folder
    again = vars(parse(["--config", str(out / "config.yaml")]))
    assert again["ppo.max_new_tokens"] == 5 and again["methods.lora.rank"] == 4 and again["task"] == "run"
    assert again["reward_python"] == f"{module}:positive" and again["output"] == str(out)
    result = json.loads((out / "result.json").read_text())
    assert (
        result["steps"] == 3
        and result["reward"] == "--reward-python"
        and result["method_config"]["rank"] == 4
    )
    assert result["config"]["max_new_tokens"] == 5 and result["peak_rss_mb"] > 0
    fresh = MultiTaskModel(tiny_base("llama"))
    spec = load_adapter(fresh, out / "adapter")
    assert (
        spec.kind == "generation"
        and spec.method == "lora"
        and spec.config["rank"] == 4
        and spec.name == "run"
    )
    assert any(v.abs().sum() > 0 for k, v in fresh.task_state_dict(spec.name).items() if "lora_B" in k)
    assert load_value_head(out / "value_head.safetensors").weight.shape == (1, 32)


def test_cmd_ppo_with_a_reward_classifier(ppo_inputs, tmp_path, capsys):
    from multitune.models import load_base

    model, prompts, _ = ppo_inputs
    judge = MultiTaskModel(load_base(str(model), device="cpu"))
    judge.add_task("sentiment", "classification", "lora", labels=["neg", "pos"])
    perturb(judge, "sentiment", 5)
    save_adapter(judge, "sentiment", tmp_path / "judge")
    common = [
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--reward-classifier",
        str(tmp_path / "judge"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]
    with pytest.raises(ConfigError, match="label 'happy' is not a label of task"):
        cmd_ppo(parse([*common, "--reward-label", "happy", "--output", str(tmp_path / "bad")]))
    cmd_ppo(parse([*common, "--reward-label", "pos", "--output", str(tmp_path / "run")]))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["reward"] == "--reward-classifier" and result["reward_label"] == "pos"
    assert 0 <= result["score_last"] <= 1


def test_cmd_ppo_one_line_errors(ppo_inputs, tmp_path):
    model, prompts, module = ppo_inputs
    reward = ["--reward-python", f"{module}:positive"]
    base = ["--model", str(model), "--device", "cpu", "--quiet", "--steps", "1"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ([*base, "--prompts", str(tmp_path / "missing.jsonl"), *reward], "prompts file .* not found"),
        ([*base, "--prompts", str(prompts)], "no reward given"),
        (
            [*base, "--prompts", str(prompts), *reward, "--reward-model", str(tmp_path)],
            "several rewards given",
        ),
        ([*base, "--prompts", str(prompts), "--reward-classifier", str(tmp_path)], "needs --reward-label"),
        ([*base, "--prompts", str(prompts), *reward, "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        ([*base, "--prompts", str(prompts), *reward, "--top-p", "1.5"], "top_p must be in"),
        ([*base, "--prompts", str(prompts), *reward, "--reference", "twin"], "reference must be one of"),
        ([*base, "--prompts", str(prompts), *reward, "--method", "nope"], "unknown method 'nope'"),
        ([*base, "--prompts", str(prompts), *reward, "--method", "prompting"], "no trainable parameters"),
        ([*base, "--prompts", str(prompts), "--reward-python", "no_colon"], "MODULE:FUNCTION"),
        (
            [*base, "--prompts", str(prompts), "--reward-python", f"{module}:absent"],
            "has no function 'absent'",
        ),
        (
            [*base, "--prompts", str(prompts), "--reward-python", "multitune_no_such_module:f"],
            "cannot import",
        ),
        (
            [
                *base,
                "--prompts",
                str(prompts),
                "--reward-classifier",
                str(tmp_path / "nowhere"),
                "--reward-label",
                "x",
            ],
            "does not exist",
        ),
        ([*base, "--prompts", str(prompts), *reward, "--output", str(tmp_path / "full")], "already exists"),
        ([*base, *reward], "no prompts given; pass --prompts FILE"),
        ([*base, "--prompts", str(prompts), *reward, "--device", "gpu"], "device must be cpu, cuda"),
        ([*base, "--prompts", str(prompts), *reward, "--task", "a b"], "task name 'a b' must be"),
    ]
    for argv, message in cases:
        if "--output" not in argv:
            argv = [*argv, "--output", str(tmp_path / "out")]
        with pytest.raises(ConfigError, match=message) as caught:
            cmd_ppo(parse(argv))
        assert "\n" not in str(caught.value), argv
    assert not (tmp_path / "out").exists()


def test_cmd_ppo_refuses_a_folder_another_command_holds(ppo_inputs, tmp_path):
    from multitune.storage import FolderInUse, output_lock

    model, prompts, module = ppo_inputs
    out = tmp_path / "held"
    with output_lock(out, "multitune ppo (the first)"), pytest.raises(FolderInUse, match="in use by"):
        cmd_ppo(
            parse(
                [
                    "--model",
                    str(model),
                    "--prompts",
                    str(prompts),
                    "--reward-python",
                    f"{module}:positive",
                    "--device",
                    "cpu",
                    "--steps",
                    "1",
                    "--output",
                    str(out),
                    "--quiet",
                ]
            )
        )
    assert not out.exists()
