"""Prompting on instruct decoders: chat-template rendering, contextual calibration, their settings and errors."""

from __future__ import annotations

import re

import optuna
import pytest
import torch
from helpers import tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.compare.search import default_params
from multitune.data import Example
from multitune.encode import encode_task
from multitune.errors import ConfigError
from multitune.methods import prompting
from multitune.methods.prompting import PromptingConfig, render
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import predict_proba

# A chat markup in the toy vocabulary: 'who' opens a user turn, 'what' the assistant's, [SEP] / [EOS] end them.
# It writes the BOS token itself, as Gemma's does, while the tokenizer adds one too.
CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}who {{ m['content'] }} [SEP] "
    "{% else %}what {{ m['content'] }} [EOS] {% endif %}{% endfor %}{% if add_generation_prompt %}what{% endif %}"
)
BINARY = {"pos": "good", "neg": "bad"}
QUERIES = [Example("good movie", label="pos"), Example("the film was very bad", label="neg")]


def _chat_base():
    base = tiny_base("llama")
    base.tokenizer.chat_template = CHAT
    return base


def _bank(base, config: PromptingConfig, pool: list[Example] | None = None) -> MultiTaskModel:
    bank = MultiTaskModel(base)
    bank.add_task("p", "classification", "prompting", config, ["neg", "pos"])
    if pool is not None:
        prompting.fit(bank, "p", pool)
    return bank


def _brute_force(bank: MultiTaskModel, prompt: str, words: list[str]) -> torch.Tensor:
    """Summed log-probs of each verbaliser after the prompt's own token ids: one forward per label."""
    tokenizer, model = bank.base.tokenizer, bank.base.model
    ids = tokenizer(prompt).input_ids
    out = []
    with torch.no_grad():
        for word in words:
            answer = tokenizer(word, add_special_tokens=False).input_ids
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0]
            out.append(torch.log_softmax(logits, -1)[torch.arange(len(answer)) + len(ids) - 1, answer].sum())
    return torch.stack(out)


# ---- chat rendering -------------------------------------------------------------------------------------
def test_chat_template_renders_instruction_and_shots_as_turns_and_scores_the_answer() -> None:
    config = PromptingConfig(
        template="{text} it was {label}", instruction="so", verbalizers=BINARY, shots=2, calibrate=False
    )
    pool = toy_sentiment(8, seed=3)
    plain = render(
        _bank(_chat_base(), PromptingConfig(**{**vars(config), "chat": "off"}), pool), "p", QUERIES, 128
    )
    bank = _bank(_chat_base(), config, pool)
    chat = render(bank, "p", QUERIES, 128)
    for query, flat, rendered in zip(QUERIES, plain, chat, strict=True):
        shots = [b.rsplit(" it was ", 1) for b in flat.text.split("\n\n")[1:-1]]  # the same shots, plain
        assert len(shots) == 2
        (t1, a1), (t2, a2) = shots
        assert rendered.text == (
            f"who so\n\n{t1} it was [SEP] what {a1} [EOS] who {t2} it was [SEP] what {a2} [EOS] "
            f"who {query.text} it was [SEP] what"
        )
    features = encode_task(bank, "p", QUERIES, 128)
    assert all(f["input_ids"].count(bank.base.tokenizer.bos_token_id) == 1 for f in features)  # one BOS
    with torch.no_grad():
        logits = torch.log_softmax(
            torch.stack([_brute_force(bank, r.text, ["bad", "good"]) for r in chat]), -1
        )
    torch.testing.assert_close(predict_proba(bank, "p", QUERIES).log(), logits, atol=1e-5, rtol=0)


def test_chat_defaults_are_an_instruction_built_from_the_label_names() -> None:
    bank = _bank(_chat_base(), PromptingConfig())
    assert render(bank, "p", QUERIES[:1], 128)[0].text == (
        "who Classify the text into one of these categories: neg, pos. Answer with the category only.\n\n"
        "Text: good movie\nAnswer: [SEP] what"
    )
    inline = _bank(_chat_base(), PromptingConfig(template="{text} it was {label}", instruction="so"))
    assert render(inline, "p", QUERIES[:1], 128)[0].text == "who so\n\ngood movie it was [SEP] what"


def test_without_a_chat_template_auto_renders_as_before_and_off_ignores_a_template() -> None:
    before = "Answer with one of: neg, pos.\n\ngood movie\nAnswer:"
    assert render(_bank(tiny_base("llama"), PromptingConfig()), "p", QUERIES[:1], 128)[0].text == before
    assert render(_bank(_chat_base(), PromptingConfig(chat="off")), "p", QUERIES[:1], 128)[0].text == before


def test_chat_prompts_drop_shots_to_fit_the_budget() -> None:
    config = PromptingConfig(template="{text} it was {label}", instruction="so", verbalizers=BINARY, shots=4)
    bank = _bank(_chat_base(), config, toy_sentiment(8, seed=3))
    count = lambda text: len(bank.base.tokenizer(text).input_ids)  # noqa: E731
    full, short = render(bank, "p", QUERIES[:1], 128)[0].text, render(bank, "p", QUERIES[:1], 30)[0].text
    assert full.count("[EOS]") == 4 and count(full) > 30
    assert (
        count(short) <= 30 and 0 < short.count("[EOS]") < 4 and short.endswith("good movie it was [SEP] what")
    )


# ---- contextual calibration -----------------------------------------------------------------------------
def test_calibration_divides_out_the_content_free_prior_and_flips_skewed_predictions() -> None:
    # A one-token against a three-token verbaliser: the sum of three log-probabilities is far lower, so the
    # raw prompt says 'pos' to nearly everything, and the content-free inputs show that skew.
    words = {"pos": "good", "neg": "not really bad"}
    config = PromptingConfig(
        template="{text} it was {label}", instruction="so", verbalizers=words, calibrate=False
    )
    raw_bank = _bank(tiny_base("llama"), config)
    calibrated = _bank(
        tiny_base("llama"),
        PromptingConfig(**{**vars(config), "calibrate": True, "calibrate_with": "content-free"}),
    )
    queries = toy_sentiment(16, seed=5)
    order = ["not really bad", "good"]  # the task's labels: neg, pos
    prior = torch.stack(
        [_brute_force(raw_bank, f"so\n\n{t} it was", order).softmax(-1) for t in ("N/A", "", "[MASK]")]
    ).mean(0)
    raw = torch.stack([_brute_force(raw_bank, f"so\n\n{q.text} it was", order) for q in queries])
    want = torch.softmax(raw - prior.log(), -1)
    assert prior[1] > 0.8  # skewed towards 'pos'
    torch.testing.assert_close(predict_proba(raw_bank, "p", queries), raw.softmax(-1), atol=1e-5, rtol=0)
    got = predict_proba(calibrated, "p", queries)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    flipped = (raw.argmax(-1) != want.argmax(-1)).sum()
    assert flipped >= 3 and torch.equal(got.argmax(-1), want.argmax(-1)), (raw.softmax(-1), want)
    torch.testing.assert_close(
        prompting.label_prior(calibrated, "p", prompting.task_config(calibrated, "p")).exp(),
        prior,
        atol=1e-5,
        rtol=0,
    )


def test_pool_calibration_divides_out_the_mean_prediction_over_the_pool_at_the_same_budget() -> None:
    words = {"pos": "good", "neg": "not really bad"}
    config = PromptingConfig(
        template="{text} it was {label}", instruction="so", verbalizers=words, shots=2, calibrate=False
    )
    pool = toy_sentiment(8, seed=3)
    raw_bank = _bank(tiny_base("llama"), config, pool)
    calibrated = _bank(
        tiny_base("llama"),
        PromptingConfig(**{**vars(config), "calibrate": True, "calibrate_with": "pool"}),
        pool,
    )
    queries = toy_sentiment(16, seed=5)
    kept = [Example(ex.text) for ex in prompting.pool_examples(prompting.task_config(raw_bank, "p"))]
    for budget in (128, 12):  # 12 tokens: the pool's prompts drop their shots as the queries' do
        prior = predict_proba(raw_bank, "p", kept, max_length=budget).mean(0)
        want = torch.softmax(predict_proba(raw_bank, "p", queries, max_length=budget).log() - prior.log(), -1)
        got = predict_proba(calibrated, "p", queries, max_length=budget)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(render(raw_bank, "p", kept[:1], 128)[0].text.split("\n\n")) == 4  # instruction, 2 shots, input
    assert prior.max() > 0.8 and (got.argmax(-1) == 0).any()  # the skew towards 'pos' is divided out


def test_pool_calibration_without_a_pool_falls_back_to_the_content_free_inputs() -> None:
    bank = _bank(tiny_base("llama"), PromptingConfig(verbalizers=BINARY))  # the defaults: the pool's prior
    prompting.fit(bank, "p", [Example("good", label="other")])  # no usable training example: no pool
    assert bank.tasks["p"].config["pool"]["examples"] == []
    content_free = _bank(
        tiny_base("llama"), PromptingConfig(verbalizers=BINARY, calibrate_with="content-free")
    )
    raw = _bank(tiny_base("llama"), PromptingConfig(verbalizers=BINARY, calibrate=False))
    want = predict_proba(content_free, "p", QUERIES)
    torch.testing.assert_close(predict_proba(bank, "p", QUERIES), want, atol=1e-6, rtol=0)
    assert not torch.allclose(predict_proba(raw, "p", QUERIES), want, atol=1e-3)


def test_the_prior_is_computed_once_per_task_and_settings() -> None:
    config = PromptingConfig(template="{text} it was {label}", verbalizers=BINARY, shots=2, calibrate=True)
    bank = _bank(_chat_base(), config, toy_sentiment(8, seed=3))
    first = predict_proba(bank, "p", QUERIES)
    entry = prompting._CACHE[bank]["p"]
    entry["prior"] = torch.tensor([0.0, -50.0])  # a stand-in prior: used as it is, not computed again
    assert (predict_proba(bank, "p", QUERIES).argmax(-1) == 1).all()
    bank.tasks["p"].config["instruction"] = "so"  # other settings: a prior of their own
    again = predict_proba(bank, "p", QUERIES)
    assert not torch.equal(again, first) and entry["prior"][1] > -50


def test_calibration_applies_to_encoders_and_is_ignored_for_generation() -> None:
    config = PromptingConfig(verbalizers=BINARY, calibrate=True)
    raw = _bank(tiny_base("bert"), PromptingConfig(verbalizers=BINARY, calibrate=False))
    bank = _bank(tiny_base("bert"), config)
    prior = prompting.label_prior(bank, "p", prompting.task_config(bank, "p"))
    torch.testing.assert_close(
        predict_proba(bank, "p", QUERIES),
        torch.softmax(predict_proba(raw, "p", QUERIES).log() - prior, -1),
        atol=1e-5,
        rtol=0,
    )
    generation = MultiTaskModel(tiny_base("llama"))
    generation.add_task("g", "generation", "prompting", PromptingConfig(calibrate=True))
    data = toy_generation(4)
    assert render(generation, "g", data[:1], 128)[0].text == data[0].text


# ---- settings, adapters, search, errors -----------------------------------------------------------------
def test_the_adapter_round_trips_chat_and_calibrate(tmp_path) -> None:
    config = PromptingConfig(
        verbalizers=BINARY, shots=2, chat="off", calibrate=False, calibrate_with="content-free"
    )
    bank = _bank(_chat_base(), config, toy_sentiment(8, seed=3))
    want = predict_proba(bank, "p", QUERIES)
    save_adapter(bank, "p", tmp_path / "a")
    fresh = MultiTaskModel(_chat_base())
    load_adapter(fresh, tmp_path / "a")
    loaded = prompting.task_config(fresh, "p")
    assert (loaded.chat, loaded.calibrate, loaded.calibrate_with) == ("off", False, "content-free")
    torch.testing.assert_close(predict_proba(fresh, "p", QUERIES), want, atol=1e-5, rtol=0)


def test_compare_searches_calibration_and_starts_from_the_default() -> None:
    trial = optuna.trial.FixedTrial(
        {"prompting.shots": 4, "prompting.selection": "random", "prompting.calibrate": True}
    )
    assert prompting.search(trial)["prompting.calibrate"] is True
    assert default_params("prompting", 1)["prompting.calibrate"] is PromptingConfig().calibrate


@pytest.mark.parametrize(
    ("base", "kind", "config", "flag"),
    [
        ("plain", "classification", PromptingConfig(chat="maybe"), "fix --prompting-chat"),
        (
            "plain",
            "classification",
            PromptingConfig(calibrate_with="batch"),
            "fix --prompting-calibrate-with",
        ),
        ("plain", "classification", PromptingConfig(calibrate="yes"), "--prompting-calibrate"),  # type: ignore[arg-type]
        ("plain", "classification", PromptingConfig(chat="on"), "use --prompting-chat auto"),
        ("chat", "generation", PromptingConfig(chat="off"), "use --prompting-chat auto"),
    ],
)
def test_bad_chat_and_calibrate_settings_name_the_flag(base: str, kind: str, config, flag: str) -> None:
    bank = MultiTaskModel(_chat_base() if base == "chat" else tiny_base("llama"))
    labels = ["neg", "pos"] if kind == "classification" else None
    with pytest.raises(ConfigError, match=re.escape(flag)) as caught:
        bank.add_task("p", kind, "prompting", config, labels)
    assert "\n" not in str(caught.value) and "p" not in bank.tasks
    bank.add_task("p", kind, "prompting", PromptingConfig(), labels)  # the advice, as printed: the default


def test_cli_reports_a_bad_chat_value(tmp_path, capsys) -> None:
    argv = ["train", "--data", "x.csv", "--method", "prompting", "--output", str(tmp_path / "r")]
    assert main([*argv, "--prompting-chat", "sometimes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--prompting-chat" in err and "Traceback" not in err
