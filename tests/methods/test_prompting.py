"""Prompting (prompt design, GPT-3-style k-shot): templates, shot selection, verbaliser scoring, no training."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.encode import collate, encode_task
from multitune.errors import ConfigError
from multitune.methods import label_scores, prompting
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompting import PromptingConfig, render
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate, predict_proba
from multitune.training.train import train

MULTI = {"pos": "very good", "neg": "not really bad", "meh": "fine"}  # 2, 3 and 1 tokens
SINGLE = {"pos": "good", "neg": "bad", "meh": "fine"}
BINARY = {"pos": "good", "neg": "bad"}
QUERIES = [
    Example("good movie", label="pos"),
    Example("the film was very bad and not nice", label="neg"),
    Example("what", label="meh"),
    Example("so happy", label="pos"),
]


def _bank(
    family: str, config: PromptingConfig, labels: list[str] | None = None, pool: list[Example] | None = None
) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("p", "classification", "prompting", config, labels or ["neg", "pos", "meh"])
    if pool is not None:
        prompting.fit(bank, "p", pool)
    return bank


def _batch(bank: MultiTaskModel, task: str, examples: list[Example]) -> dict[str, torch.Tensor]:
    features = encode_task(bank, task, examples, 128)
    return collate(features, bank.base.tokenizer.pad_token_id, bank.slots.index(task))


def _mean_hidden(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The base model's mean last hidden state of one unpadded sequence, straight from transformers."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)


# ---- templates and shots ---------------------------------------------------------------------------
def test_zero_shot_renders_the_template_and_the_instruction() -> None:
    config = PromptingConfig(
        template="Review: {text}\\nSentiment: {label}",
        instruction="Pick {labels}.",
        verbalizers="pos=very good,neg=bad",
        shot_separator=" || ",
    )
    assert config.template == "Review: {text}\nSentiment: {label}" and config.verbalizers == {
        "pos": "very good",
        "neg": "bad",
    }
    bank = _bank("llama", config, ["neg", "pos"])
    out = render(bank, "p", [Example("good movie", label="pos")], 128)
    assert out == [Example(text="Pick bad, very good. || Review: good movie\nSentiment:", label="pos")]
    defaults = _bank("gpt2", PromptingConfig(), ["neg", "pos"])
    assert render(defaults, "p", [Example("good movie"), Example("a", text_pair="b")], 128) == [
        Example(text="Answer with one of: neg, pos.\n\ngood movie\nAnswer:"),
        Example(text="Answer with one of: neg, pos.\n\na\nb\nAnswer:"),
    ]
    generation = MultiTaskModel(tiny_base("llama"))
    generation.add_task(
        "g", "generation", "prompting", PromptingConfig(template="Q: {input} A: {response} .")
    )
    assert render(generation, "g", [Example("why", response="so")], 128) == [
        Example(text="Q: why A:", response="so")
    ]


def test_random_shots_are_seeded_per_input_never_the_input_and_balanced() -> None:
    pool = toy_sentiment(12, seed=1)
    config = PromptingConfig(
        template="{text} it was {label}",
        instruction="",
        verbalizers=SINGLE,
        shots=3,
        shot_separator=" | ",
        pool_size=8,
    )
    bank = _bank("llama", config, pool=pool)
    kept = bank.tasks["p"].config["pool"]["examples"]
    assert len(kept) == 8 and sum(e["label"] == "pos" for e in kept) == 4  # labels in turn: balanced
    queries = [Example(e["text"], label=e["label"]) for e in kept[:3]] + QUERIES
    first = render(bank, "p", queries, 128)
    again = render(bank, "p", queries[::-1], 128)[::-1]  # another batch order: the same shots
    assert first == again
    for query, rendered in zip(queries, first, strict=True):
        blocks = rendered.text.split(" | ")
        assert len(blocks) == 4 and blocks[-1] == f"{query.text} it was"
        words = {e["text"]: SINGLE[e["label"]] for e in kept}
        assert all(b.rsplit(" it was ", 1)[1] == words[b.rsplit(" it was ", 1)[0]] for b in blocks[:-1])
        assert query.text not in [b.rsplit(" it was ", 1)[0] for b in blocks[:-1]]
    reseeded = _bank("llama", PromptingConfig(**{**bank.tasks["p"].config, "seed": 5}))
    assert render(reseeded, "p", queries, 128) != first


def test_similar_shots_are_the_nearest_pool_examples_nearest_last() -> None:
    # The query itself is in the pool (twice: "good  movie" has the same tokens) and is never its own shot.
    pool = [
        Example(t, label=lab)
        for t, lab in [
            ("good movie", "pos"),
            ("awful sad film", "neg"),
            ("good  movie", "neg"),
            ("what why how", "meh"),
            ("good film", "pos"),
            ("the bad food", "neg"),
            ("good movie film", "meh"),
        ]
    ]
    config = PromptingConfig(
        template="{text} it was {label}",
        instruction="",
        verbalizers=SINGLE,
        shots=3,
        selection="similar",
        shot_separator=" | ",
    )
    bank = _bank("llama", config, pool=pool)
    shots = [
        b.rsplit(" it was ", 1)[0] for b in render(bank, "p", QUERIES[:1], 128)[0].text.split(" | ")[:-1]
    ]
    tokenizer, backbone = bank.base.tokenizer, bank.base.model.model
    query = _mean_hidden(backbone, tokenizer("good movie").input_ids)
    sims = {
        ex.text: float(
            F.cosine_similarity(query, _mean_hidden(backbone, tokenizer(ex.text).input_ids), dim=0)
        )
        for ex in pool
        if ex.text.split() != ["good", "movie"]
    }
    assert shots == sorted(sims, key=sims.get)[-3:]  # ascending: the nearest next to the query
    assert len(set(sims.values())) == len(sims)  # no ties: the order is the known answer


def test_long_prompts_drop_shots_then_cut_the_input_never_the_answer_slot() -> None:
    pool = [
        Example("good movie and the film was very nice and really great", label="pos"),
        Example("bad food and the service was very poor and really awful", label="neg"),
    ]
    config = PromptingConfig(template="{text} it was {label}", instruction="", verbalizers=BINARY, shots=2)
    bank = _bank("llama", config, ["neg", "pos"], pool=pool)
    count = lambda text: len(bank.base.tokenizer(text).input_ids)  # noqa: E731
    assert count(render(bank, "p", QUERIES[:1], 128)[0].text) == 1 + 14 + 14 + 4
    one = render(bank, "p", QUERIES[:1], 20)[0].text
    assert count(one) <= 20 and one.count("it was") == 2 and one.endswith("good movie it was")
    cut = render(bank, "p", [Example("the film was very bad and not nice so sad and the food was poor")], 8)[
        0
    ].text
    assert count(cut) <= 8 and cut.endswith("it was") and cut.startswith("the film")


# ---- scoring -----------------------------------------------------------------------------------------
def _brute_force(bank: MultiTaskModel, prompt: str, words: list[str]) -> torch.Tensor:
    """Summed log-probs of each verbaliser after the prompt: one full forward per label, no cache, no batch."""
    tokenizer, model = bank.base.tokenizer, bank.base.model
    prompt_ids = tokenizer(prompt).input_ids
    out = []
    with torch.no_grad():
        for word in words:
            answer = tokenizer(word, add_special_tokens=False).input_ids
            if bank.base.arch == "seq2seq":
                logits = model(input_ids=torch.tensor([prompt_ids]), labels=torch.tensor([answer])).logits[0]
                logp = torch.log_softmax(logits, -1)[torch.arange(len(answer)), answer]
            else:
                logits = model(input_ids=torch.tensor([prompt_ids + answer])).logits[0]
                logp = torch.log_softmax(logits, -1)[torch.arange(len(answer)) + len(prompt_ids) - 1, answer]
            out.append(logp.sum())
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize(("words", "max_rows"), [(MULTI, 256), (MULTI, 2), (SINGLE, 256)])
def test_verbaliser_scores_equal_brute_force(
    family: str, words: dict[str, str], max_rows: int, monkeypatch
) -> None:
    monkeypatch.setattr(label_scores, "MAX_ROWS", max_rows)  # 2: one label per continuation forward
    config = PromptingConfig(
        template="{text} it was {label}", instruction="so", verbalizers=words, shots=1, calibrate=False
    )
    bank = _bank(family, config, pool=toy_sentiment(6, seed=2))
    batch = _batch(bank, "p", QUERIES)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # prompts of different lengths share the batch
    with torch.no_grad():
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    prompts = render(bank, "p", QUERIES, 128)
    want = torch.stack(
        [_brute_force(bank, p.text, [words[c] for c in ["neg", "pos", "meh"]]) for p in prompts]
    )
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    probs = predict_proba(bank, "p", QUERIES)
    torch.testing.assert_close(probs, torch.softmax(want, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_prompting_rows_and_lora_rows_in_one_batch_equal_each_alone(family: str) -> None:
    bank = _bank(
        family,
        PromptingConfig(template="{text} it was {label}", verbalizers=MULTI, shots=1),
        pool=toy_sentiment(6, seed=2),
    )
    bank.add_task("lora", "classification", "lora", LoRAConfig(rank=2), ["x", "y"])
    # Random LoRA weights on every linear layer (BERT's default targets). At 0.3 the activations of the tiny
    # model grow until a batch of two rows of one task already differs from each row alone by 1e-5 (the
    # kernels' summation order, not mixing); at 0.2 both stay within 3e-7.
    with torch.no_grad():
        for param in bank.task_parameters("lora").values():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    features = encode_task(bank, "p", QUERIES[:2], 128) + encode_task(bank, "lora", QUERIES[2:], 128)
    slots = [0, 0, 1, 1]
    order = [2, 0, 3, 1]  # rows of the two tasks interleaved
    batch = collate([features[i] for i in order], bank.base.tokenizer.pad_token_id, [slots[i] for i in order])
    with torch.no_grad():
        mixed = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        for r, i in enumerate(order):
            alone_batch = collate([features[i]], bank.base.tokenizer.pad_token_id, slots[i])
            alone = bank.classify(
                alone_batch["input_ids"], alone_batch["attention_mask"], alone_batch["task_ids"]
            )
            torch.testing.assert_close(mixed[r : r + 1, : alone.shape[1]], alone, atol=1e-5, rtol=0)
    assert torch.isinf(mixed[[0, 2], 2]).all() and torch.isfinite(mixed[[1, 3]]).all()  # 2 labels vs 3


def test_encoder_scores_are_cosines_to_the_verbaliser_prototypes() -> None:
    config = PromptingConfig(
        verbalizers={"pos": "good", "neg": "bad", "meh": "what"}, temperature=0.1, calibrate=False
    )
    bank = _bank("bert", config)
    batch = _batch(bank, "p", QUERIES)
    with torch.no_grad():
        logits = bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    tokenizer, model = bank.base.tokenizer, bank.base.model
    labels = torch.stack([_mean_hidden(model, tokenizer(w).input_ids) for w in ["bad", "good", "what"]])
    for row, query in zip(logits, QUERIES, strict=True):
        x = _mean_hidden(model, tokenizer(query.text).input_ids)
        cos = F.cosine_similarity(x[None], labels, dim=-1)
        torch.testing.assert_close(row, cos / 0.1, atol=1e-5, rtol=0)
        assert int(row.argmax()) == int(cos.argmax())


def test_encoder_shots_pull_a_label_prototype_towards_similar_examples() -> None:
    # With two similar shots, both 'meh', the 'meh' prototype becomes the mean of u(e('what')) and the
    # shots' unit embeddings, and wins; zero-shot picks by the verbalisers alone and does not.
    pool = [
        Example("good movie film", label="meh"),
        Example("awful sad", label="neg"),
        Example("the good movie", label="meh"),
        Example("nice food", label="pos"),
    ]
    words = {"pos": "good", "neg": "bad", "meh": "what"}
    zero = _bank("bert", PromptingConfig(verbalizers=words, calibrate=False), pool=pool)
    two = _bank(
        "bert", PromptingConfig(verbalizers=words, shots=2, selection="similar", calibrate=False), pool=pool
    )
    tokenizer, model = two.base.tokenizer, two.base.model
    unit = lambda text: F.normalize(_mean_hidden(model, tokenizer(text).input_ids), dim=0)  # noqa: E731
    x = unit("good movie")
    nearest = sorted(pool, key=lambda ex: float(x @ unit(ex.text)))[-2:]
    assert [ex.label for ex in nearest] == ["meh", "meh"]
    prototypes = [unit(w) for w in ["bad", "good", "what"]]
    prototypes[2] = (prototypes[2] + sum(unit(ex.text) for ex in nearest)) / 3
    want = torch.stack([F.cosine_similarity(x, p, dim=0) / 0.05 for p in prototypes])
    torch.testing.assert_close(
        predict_proba(two, "p", QUERIES[:1]), want.softmax(-1)[None], atol=1e-5, rtol=0
    )
    assert predict_proba(two, "p", QUERIES[:1]).argmax() == 2
    assert predict_proba(zero, "p", QUERIES[:1]).argmax() != 2


def test_similar_shots_beat_zero_shot_on_the_toy_task_with_an_encoder() -> None:
    train_data, test = toy_sentiment(64, seed=0), toy_sentiment(40, seed=7)
    scores = {}
    for shots in (0, 4):
        config = PromptingConfig(verbalizers=BINARY, shots=shots, selection="similar")
        bank = _bank("bert", config, ["neg", "pos"])
        train(bank, "p", train_data, [], TrainConfig(), progress=False)
        scores[shots] = evaluate(bank, "p", test)["accuracy"]
    assert scores[0] <= 0.55 and scores[4] >= scores[0] + 0.15, scores


# ---- training, storage, CLI ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
def test_train_fits_with_zero_steps_no_parameters_and_scores_validation(family: str, tmp_path) -> None:
    config = PromptingConfig(template="{text} it was {label}", verbalizers=BINARY, shots=2, pool_size=10)
    bank = _bank(family, config, ["neg", "pos"])
    assert bank.task_parameters("p") == {} and "p" not in bank.heads
    data = toy_sentiment(40)
    result = train(bank, "p", data[:32], data[32:], TrainConfig(epochs=5), run_dir=tmp_path, progress=False)
    assert result.steps == 0 and result.best_step == 0 and result.metric == "accuracy"
    assert set(result.history[0]) >= {"step", "split", "accuracy", "macro_f1", "loss"}
    assert result.best_metric == result.history[0]["accuracy"]
    assert (
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["accuracy"] == result.best_metric
    )
    assert len(bank.tasks["p"].config["pool"]["examples"]) == 10
    assert set(evaluate(bank, "p", data[32:])) == {"accuracy", "macro_f1", "loss"}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_prompting_puts_shots_with_responses_before_the_input(family: str) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("g", "generation", "prompting", PromptingConfig(shots=2, shot_separator=" | "))
    assert bank.task_parameters("g") == {}
    data = toy_generation(12)
    result = train(bank, "g", data[:8], data[8:], TrainConfig(metric="loss"), progress=False)
    assert result.steps == 0 and "perplexity" in result.history[0]
    rendered = render(bank, "g", data[8:9], 128)[0]
    blocks = rendered.text.split(" | ")
    assert len(blocks) == 3 and blocks[-1] == data[8].text and rendered.response == data[8].response
    assert all(len(b.split("\n")) == 2 and b.split("\n")[1].startswith("it is") for b in blocks[:-1])
    assert set(evaluate(bank, "g", data[8:], max_new_tokens=3)) == {
        "loss",
        "perplexity",
        "exact_match",
        "rouge_l",
    }


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_and_load_give_identical_probabilities(family: str, tmp_path) -> None:
    config = PromptingConfig(
        template="{text} it was {label}", verbalizers=MULTI, shots=2, selection="similar"
    )
    bank = _bank(family, config, pool=toy_sentiment(10, seed=4))
    want = predict_proba(bank, "p", QUERIES)
    save_adapter(bank, "p", tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter.json").read_text())["task"]["config"]["pool"]["examples"]
    fresh = MultiTaskModel(tiny_base(family))
    load_adapter(fresh, tmp_path / "a")
    assert fresh.task_parameters("p") == {} and fresh not in prompting._CACHE  # embeddings come on first use
    torch.testing.assert_close(predict_proba(fresh, "p", QUERIES), want, atol=1e-5, rtol=0)
    fresh.remove_task("p")
    assert not fresh.tasks and "p" not in prompting._CACHE.get(fresh, {})


def test_cli_train_eval_predict(tmp_path, llama_dir) -> None:
    model_dir = llama_dir
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(40)])
    run = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--output",
        str(run),
        "--quiet",
        "--method",
        "prompting",
        "--prompting-shots",
        "2",
        "--prompting-verbalizers",
        "pos=very good,neg=bad",
        "--prompting-template",
        "{text}\\nit was {label}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "multitune", *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "0 trainable parameters, 0 steps" in done.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 0 and result["trainable_parameters"] == 0 and "accuracy" in result["test"]
    adapter = json.loads((run / "adapter" / "adapter.json").read_text())
    assert adapter["task"]["config"]["template"] == "{text}\nit was {label}"
    assert len(adapter["task"]["config"]["pool"]["examples"]) == 32

    assert main(["eval", str(run), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(
        result["test"]["accuracy"]
    )
    inputs = tmp_path / "new.jsonl"
    inputs.write_text("".join(json.dumps({"review": ex.text}) + "\n" for ex in toy_sentiment(6, seed=3)))
    assert (
        main(
            [
                "predict",
                str(run),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path / "p.csv"),
                "--text-column",
                "review",
            ]
        )
        == 0
    )
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["prediction"] for r in rows} <= {"pos", "neg"}


def test_cli_reports_a_bad_prompting_flag(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "train",
                "--data",
                "x.csv",
                "--method",
                "prompting",
                "--prompting-shots",
                "-2",
                "--output",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--prompting-shots" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("kind", "config", "flag"),
    [
        ("classification", PromptingConfig(template="{text} {lable}"), "unknown placeholder(s) {lable}"),
        ("classification", PromptingConfig(instruction="say {text}"), "--prompting-instruction"),
        ("classification", PromptingConfig(template="{text} is it"), "needs {label}"),
        ("classification", PromptingConfig(template="{label} {response} {text}"), "--prompting-template"),
        ("classification", PromptingConfig(template="it was {label}"), "has no {text}"),
        ("classification", PromptingConfig(shots=-1), "--prompting-shots"),
        ("classification", PromptingConfig(selection="nearest"), "--prompting-selection"),
        ("classification", PromptingConfig(verbalizers="pos:good"), "--prompting-verbalizers"),
        ("classification", PromptingConfig(verbalizers={"positive": "good"}), "label(s) ['positive']"),
        (
            "classification",
            PromptingConfig(verbalizers={"pos": "good", "neg": "good"}),
            "share the verbaliser",
        ),
        ("classification", PromptingConfig(shots=8, pool_size=4), "--prompting-pool-size"),
        ("classification", PromptingConfig(temperature=0.0), "--prompting-temperature"),
        ("generation", PromptingConfig(template="{text} it was {label}"), "needs {response}"),
    ],
)
def test_bad_configs_name_the_flag(kind: str, config: PromptingConfig, flag: str) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match=re.escape(flag)):
        bank.add_task("p", kind, "prompting", config, ["neg", "pos"] if kind == "classification" else None)
    assert "p" not in bank.tasks


def test_shots_without_training_examples_are_refused() -> None:
    bank = _bank("llama", PromptingConfig(shots=2), ["neg", "pos"])
    with pytest.raises(ConfigError, match="--prompting-shots 0"):
        prompting.fit(bank, "p", [Example("good", label="other")])
