"""Reference profiles: built from a task's forward, calibrated, small, saved atomically and read back."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturb, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.encode import collate, encode_task
from multitune.errors import ConfigError
from multitune.health.profile import (
    PROFILE_JSON,
    PROFILE_TENSORS,
    Profile,
    build_profile,
    fit_temperature,
    load_profile,
    observe_examples,
    save_profile,
    token_stats,
)
from multitune.methods.lora import LoRAConfig


@pytest.fixture(scope="module")
def bank() -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("sent", "classification", "lora", LoRAConfig(rank=2), ["neg", "pos"])
    perturb(bank, "sent", 0)
    return bank


def test_a_classification_profile_holds_the_reference_as_the_head_saw_it(bank: MultiTaskModel) -> None:
    examples = toy_sentiment(80)
    profile = build_profile(bank, "sent", examples, 32, sample=50, dimensions=8)
    # half the rows at most are the sample (the PCA is fitted on the other half)
    assert profile.features.shape == (40, 8) and profile.components.shape == (32, 8)
    assert profile.lengths.shape == profile.unknown_rates.shape == profile.confidences.shape == (40,)
    assert profile.rows == 80 and float(profile.label_counts.sum()) == 80
    seen = observe_examples(bank, "sent", examples, 32)
    assert seen.pooled is not None
    # the stored reference rows are exactly the projection of the pooled vectors a forward gives
    projected = profile.project(seen.pooled)
    assert (
        float(
            torch.cdist(profile.features, projected, compute_mode="donot_use_mm_for_euclid_dist")
            .min(1)
            .values.max()
        )
        < 1e-4
    )
    axes = profile.components.double()  # principal axes: orthonormal (to float16's precision)
    assert torch.allclose(axes.T @ axes, torch.eye(8, dtype=torch.float64), atol=2e-3)
    # lengths are the tokens of each row as encoded ([BOS] + words), none unknown in the toy vocabulary
    assert set(profile.lengths.tolist()) == {6.0} and float(profile.unknown_rates.sum()) == 0
    assert 0.0 <= profile.accuracy <= 1.0 and profile.temperature > 0


def test_token_stats_count_unknown_tokens_within_the_mask() -> None:
    ids = torch.tensor([[2, 1, 5, 1], [2, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert token_stats(ids, mask, 1) == ([4, 2], [0.5, 0.5])
    assert token_stats(ids, mask, None) == ([4, 2], [0.0, 0.0])


def test_temperature_minimises_the_validation_nll() -> None:
    g = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 3, (400,), generator=g)
    logits = torch.randn(400, 3, generator=g) + 6.0 * torch.nn.functional.one_hot(gold, 3)
    noisy = torch.where(torch.rand(400, generator=g) < 0.3, torch.randint(0, 3, (400,), generator=g), gold)
    t = fit_temperature(logits, noisy)  # overconfident logits: the fitted T spreads them (T > 1)
    grid = torch.linspace(0.05, 20, 4000)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits.double() / v, noisy) for v in grid])
    assert t > 1 and t == pytest.approx(float(grid[nll.argmin()]), abs=0.01)
    assert fit_temperature(logits, torch.zeros(0, dtype=torch.long)) == 1.0


def test_save_and_load_round_trip_without_pickle(bank: MultiTaskModel, tmp_path) -> None:
    profile = build_profile(bank, "sent", toy_sentiment(40), 32)
    save_profile(profile, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROFILE_JSON, PROFILE_TENSORS]
    back = load_profile(tmp_path)
    assert back is not None and back.labels == ["neg", "pos"] and back.temperature == profile.temperature
    for name in ("mean", "components", "features", "lengths", "label_counts", "confidences"):
        assert torch.equal(getattr(back, name), getattr(profile, name)), name
    assert load_profile(tmp_path / "nothing-here") is None


def test_a_damaged_profile_says_how_to_rebuild_it(bank: MultiTaskModel, tmp_path) -> None:
    save_profile(build_profile(bank, "sent", toy_sentiment(20), 32), tmp_path)
    data = bytearray((tmp_path / PROFILE_TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / PROFILE_TENSORS).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum.*multitune profile RUN --data FILE"):
        load_profile(tmp_path)
    save_profile(build_profile(bank, "sent", toy_sentiment(20), 32), tmp_path)
    meta = json.loads((tmp_path / PROFILE_JSON).read_text())
    (tmp_path / PROFILE_JSON).write_text(json.dumps({**meta, "temperature": "hot"}))
    with pytest.raises(ConfigError, match="field temperature"):
        load_profile(tmp_path)
    (tmp_path / PROFILE_JSON).write_text(json.dumps({"format": "x"}))
    with pytest.raises(ConfigError, match="damaged"):
        load_profile(tmp_path)


def test_a_profile_of_a_large_base_is_a_few_hundred_kilobytes(tmp_path) -> None:
    hidden, k, n = 4096, 32, 500  # a 7B-class hidden size, the default dimensions and sample
    g = torch.Generator().manual_seed(0)
    profile = Profile(
        task="t",
        kind="classification",
        labels=[str(i) for i in range(77)],
        mean=torch.randn(hidden, generator=g),
        components=torch.randn(hidden, k, generator=g).half(),
        features=torch.randn(n, k, generator=g),
        lengths=torch.randn(n, generator=g),
        unknown_rates=torch.randn(n, generator=g),
        label_counts=torch.ones(77),
        confidences=torch.rand(n, generator=g),
    )
    save_profile(profile, tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert size < 400_000


def test_an_empty_reference_is_an_error_naming_the_fix(bank: MultiTaskModel) -> None:
    with pytest.raises(ConfigError, match="non-empty --data"):
        build_profile(bank, "sent", [], 32)


def test_a_generation_profile_holds_response_lengths_and_log_probs() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("gen", "generation", "lora", LoRAConfig(rank=2))
    examples = toy_generation(12)
    profile = build_profile(bank, "gen", examples, 32)
    assert profile.kind == "generation" and not profile.has_features and profile.label_counts.numel() == 0
    # "it is good" / "it is bad" + EOS: 4 response tokens; a random model: log-probs near -log(vocab)
    assert set(profile.response_lengths.tolist()) == {4.0}
    assert profile.mean_logprobs.shape == (12,) and bool((profile.mean_logprobs < 0).all())
    with torch.no_grad():
        nll, count = bank.lm_loss(collate(encode_task(bank, "gen", examples[:1], 32), 0, 0))
    seen = observe_examples(bank, "gen", examples[:1], 32)
    assert seen.mean_logprobs[0] == pytest.approx(-float(nll) / int(count), abs=1e-4)
