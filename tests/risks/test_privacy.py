"""DP-SGD (issue 18, multitune.risks.privacy): per-sample gradients of every adapter method against a batch of
one, Opacus' accountant test vectors, the calibration, clipping, Poisson batches, a private run that learns
(opacus#820: weights that move on noise alone while the model learns nothing), result.json's record, and the
bad inputs with one line each."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import NEGATIVE, POSITIVE, WORDS, has_package, perturb, save_tiny, tiny_base, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.config import TrainConfig
from multitune.encode import collate, encode_task
from multitune.risks import privacy
from multitune.risks.privacy import (
    PoissonBatches,
    PrivacyPlan,
    clipped_sum,
    per_sample_gradients,
    private_step,
)
from multitune.training.train import train

needs_opacus = pytest.mark.skipif(
    not has_package("opacus"), reason="opacus not installed (pip install '.[dp]')"
)
ADAPTER_METHODS = ["lora", "ia3", "prompt", "prefix", "adapter", "base"]


def bank_with(family: str, method: str) -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("t", "classification", method, None, ["pos", "neg"])
    # no method at its identity (LoRA's B = 0 gives A no gradient); at 0.3 on every linear layer (BERT's LoRA
    # default) the tiny model's float32 rounding alone reaches 1e-5
    perturb(bank, "t", seed=1, scale=0.2)
    bank.eval()  # no dropout: one row's gradient is then one number
    return bank


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_per_sample_gradients_equal_a_batch_of_one(family, method):
    bank = bank_with(family, method)
    examples = [
        replace(e, text=" ".join(e.text.split()[: 2 + i % 4])) for i, e in enumerate(toy_sentiment(6))
    ]
    features = encode_task(bank, "t", examples, 16)
    pad, slot = bank.base.tokenizer.pad_token_id, bank.slots.index("t")
    batch = collate(features, pad, slot)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is in play
    grads, losses = per_sample_gradients(bank, "t", batch)
    params = bank.task_parameters("t")
    assert set(grads) == set(params)
    for i in range(len(features)):
        bank.zero_grad()
        loss = bank(collate([features[i]], pad, slot))
        loss.backward()
        assert float(losses[i]) == pytest.approx(loss.item(), abs=1e-5)
        for key, param in params.items():
            torch.testing.assert_close(grads[key][i], param.grad, atol=1e-5, rtol=0)


@needs_opacus
def test_the_accountants_reproduce_opacus_test_vectors():
    # Opacus' own tests (opacus/tests/accountants_test.py): sigma 1.5, q 0.04, 90 epochs, delta 1e-5. They take
    # int(90 / 0.04) = 2250 steps for RDP but int(90 // 0.04) = 2249 for PRV (float floor division); PRV at 2250
    # steps gives 6.7791.
    assert privacy.spent_epsilon(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-3)
    assert privacy.spent_epsilon(1.5, 0.04, 2249, 1e-5, "prv") == pytest.approx(6.7774, abs=1e-3)
    assert privacy.spent_epsilon(1.5, 0.04, 2250, 1e-5, "prv") == pytest.approx(6.7791, abs=1e-3)


@needs_opacus
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_noise_multiplier_is_calibrated_to_the_run(accountant):
    config = TrainConfig(epochs=3, batch_size=16, dp_epsilon=3.0, dp_accountant=accountant)
    plan = privacy.plan(config, 400, "lora", steps=75)
    assert plan.sample_rate == 0.04 and plan.delta == pytest.approx(min(1 / 400**1.1, 1e-5))
    assert 2.9 <= plan.spent(75) <= 3.0  # reached, not exceeded
    assert plan.spent(30) < plan.spent(75)  # a run stopped early spent less
    looser = privacy.plan(TrainConfig(epochs=3, batch_size=16, dp_epsilon=8.0), 400, "lora", steps=75)
    assert looser.noise_multiplier < plan.noise_multiplier


def test_clipping_bounds_every_row_and_leaves_small_gradients_alone():
    grads = {
        "a": torch.randn(5, 3, 4) * torch.tensor([0.01, 1, 10, 100, 0.5]).view(5, 1, 1),
        "b": torch.randn(5, 7),
    }
    summed, norms = clipped_sum(grads, max_norm=1.0)
    flat = torch.cat([grads["a"].flatten(1), grads["b"]], dim=1)
    torch.testing.assert_close(norms, flat.norm(dim=1))
    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    clipped = flat * factor[:, None]
    assert (clipped.norm(dim=1) <= 1.0 + 1e-5).all()
    small = norms < 1.0
    torch.testing.assert_close(clipped[small], flat[small])  # under the bound: unchanged
    torch.testing.assert_close(torch.cat([summed["a"].flatten(), summed["b"]]), clipped.sum(0))


def test_a_private_step_is_the_clipped_sum_plus_noise_over_the_expected_batch():
    bank = bank_with("bert", "lora")
    features = encode_task(bank, "t", toy_sentiment(8), 16)
    pad, slot = bank.base.tokenizer.pad_token_id, bank.slots.index("t")

    def batch_of(rows: list[int]) -> dict[str, torch.Tensor]:
        return collate([features[i] for i in rows], pad, slot)

    params = bank.task_parameters("t")
    rows = [0, 2, 3, 5, 6]
    exact, _ = clipped_sum(per_sample_gradients(bank, "t", batch_of(rows))[0], 0.05)
    for sigma in (0.0, 2.0):
        plan = PrivacyPlan(8.0, 1e-5, sigma, 0.05, 0.5, 10, "prv")
        stats = private_step(bank, "t", plan, 8, batch_of, chunk=2)(rows)  # chunks of 2 rows: same sum
        assert stats["batch"] == 5 and 0 <= stats["clipped"] <= 1
        noise = torch.cat([(params[k].grad * 4 - exact[k]).flatten() for k in params])  # q n = 4
        if sigma == 0:
            assert noise.abs().max() < 1e-6
        else:  # N(0, (sigma C)^2) per coordinate
            assert noise.std().item() == pytest.approx(sigma * 0.05, rel=0.1)
    plan = PrivacyPlan(8.0, 1e-5, 0.0, 1.0, 0.5, 10, "prv")
    stats = private_step(bank, "t", plan, 8, batch_of, chunk=4)([])  # an empty Poisson batch: noise only
    assert stats["batch"] == 0 and all(float(p.grad.abs().max()) == 0 for p in params.values())


def test_poisson_batches_are_independent_draws_at_the_sample_rate_and_replayable():
    batches = PoissonBatches(1000, 0.05, 50, seed=3)
    sizes = [len(batches.get(0, i, [True])) for i in range(batches.count(0))]
    assert batches.count(0) == 20 and len(set(sizes)) > 1  # sizes vary
    assert abs(sum(sizes) / len(sizes) - 50) < 10
    assert batches.get(1, 4, [True]) == PoissonBatches(1000, 0.05, 50, seed=3).get(1, 4, [True])
    assert batches.get(1, 4, [True]) != batches.get(1, 5, [True])


@needs_opacus
def test_a_private_run_changes_the_weights_and_beats_chance():
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("t", "classification", "lora", None, ["pos", "neg"])
    before = {k: v.clone() for k, v in bank.task_state_dict("t").items()}
    config = TrainConfig(
        epochs=8, batch_size=16, max_length=16, learning_rate=0.02, dp_epsilon=8.0, device="cpu"
    )
    result = train(bank, "t", toy_sentiment(256), toy_sentiment(64, seed=1), config, progress=False)
    after = bank.task_state_dict("t")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert result.best_metric is not None and result.best_metric >= 0.75  # chance is 0.5
    assert result.problem is None
    assert result.privacy is not None and 7.0 < result.privacy["epsilon"] <= 8.0
    assert result.privacy["noise_multiplier"] > 0.5  # real noise, not a vanishing one


def write_rows(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            row = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(WORDS[13:], 3)
            rng.shuffle(row)
            writer.writerow([" ".join(row), label])
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny("bert", tmp_path_factory.mktemp("tiny") / "bert"))


def cli_train(model: str, data: Path, out: Path, *flags: str) -> int:
    return main(
        ["train", "--model", model, "--data", str(data), "--output", str(out), "--epochs", "1",
         "--max-length", "16", "--quiet", *flags]
    )  # fmt: skip


@needs_opacus
def test_train_records_and_prints_the_privacy_spent(model, tmp_path, capsys):
    data = write_rows(tmp_path / "data.csv", 100)  # 80 training rows
    assert cli_train(model, data, tmp_path / "run", "--method", "prefix", "--dp-epsilon", "4") == 0
    dp = json.loads((tmp_path / "run" / "result.json").read_text())["dp"]
    assert set(dp) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "accountant"}
    assert 0 < dp["epsilon"] <= 4 and dp["delta"] == pytest.approx(
        1 / 80**1.1 if 1 / 80**1.1 < 1e-5 else 1e-5
    )
    assert dp["sample_rate"] == 16 / 80 and dp["max_grad_norm"] == 1.0 and dp["accountant"] == "prv"
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith(f"differential privacy: epsilon {dp['epsilon']:.3f} spent") for line in lines[-2:]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-epsilon", "0"], "--dp-epsilon must be > 0 (got 0.0)"),
        (["--dp-epsilon", "-1"], "--dp-epsilon must be > 0"),
        (
            ["--dp-epsilon", "3", "--dp-delta", "0.03"],
            "--dp-delta must be in (0, 1/n) = (0, 0.0263) for n = 38",
        ),
        (["--dp-epsilon", "3", "--dp-delta", "0.5"], "publishing one example whole"),
        (
            ["--dp-epsilon", "3", "--method", "full"],
            "--dp-epsilon with --method full: full fine-tuning trains",
        ),
        (["--dp-epsilon", "3", "--method", "prompting"], "puts training examples verbatim"),
        (["--dp-epsilon", "3", "--grad-accum", "2"], "--grad-accum must be 1 with --dp-epsilon"),
        (["--dp-epsilon", "3", "--gradient-checkpointing"], "--gradient-checkpointing with --dp-epsilon"),
        (["--dp-epsilon", "3", "--counterfactual-augment"], "a row and its counterfactuals are one person's"),
    ],
)
def test_bad_private_settings_are_refused_in_one_line(model, tmp_path, capsys, flags, message):
    data = write_rows(tmp_path / "data.csv", 50)  # 38 training rows (the stratified split)
    assert cli_train(model, data, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "result.json").exists()


def test_compare_refuses_methods_that_cannot_keep_the_budget(model, tmp_path, capsys):
    data = write_rows(tmp_path / "data.csv", 50)
    args = ["compare", "--model", model, "--data", str(data), "--methods", "lora,full,prompting", "--output",
            str(tmp_path / "cmp"), "--quiet", "--dp-epsilon", "3"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--dp-epsilon compares methods under one privacy budget, which full, prompting cannot keep" in err
    assert len(err.strip().splitlines()) == 1


@needs_opacus
def test_compare_records_the_budget_each_method_spent(model, tmp_path):
    data = write_rows(tmp_path / "data.csv", 80)
    args = ["compare", "--model", model, "--data", str(data), "--methods", "lora", "--trials", "1",
            "--max-epochs", "1", "--max-length", "16", "--output", str(tmp_path / "cmp"), "--quiet",
            "--dp-epsilon", "5"]  # fmt: skip
    assert main(args) == 0
    for method in ("lora",):
        dp = json.loads((tmp_path / "cmp" / "results" / f"{method}.json").read_text())["dp"]
        assert 0 < dp["epsilon"] <= 5 and dp["target_epsilon"] == 5
