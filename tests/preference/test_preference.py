"""Preference tuning: pair files (HH included), response log-probabilities, the reward model, DPO, the CLI."""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from helpers import NEGATIVE, POSITIVE, WORDS, perturb, shared_dataset, tiny_base, tiny_model

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Example
from multitune.encode import collate, encode_task
from multitune.errors import ConfigError, DataError
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompt import PromptConfig
from multitune.models import load_base
from multitune.preference.cli import add_dpo_arguments, add_reward_arguments, cmd_dpo, cmd_reward
from multitune.preference.dpo import train_dpo
from multitune.preference.pairs import Pair, load_pairs, load_prompts, split_pairs
from multitune.preference.reward import pair_accuracy, train_reward
from multitune.preference.scoring import add_reward_task, reward_scores, score_rows, sequence_logps
from multitune.storage import load_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


FILLER = ["very", "really", "quite", "so"]
TOPICS = ["the", "movie", "film", "food", "place", "service", "was", "is", "it", "this"]


def toy_pairs(n: int, seed: int) -> list[Pair]:
    """Chosen responses carry a positive word, rejected ones a negative word: learnable by a tiny model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.sample(TOPICS, 3))
        out.append(
            Pair(
                prompt,
                f"{rng.choice(FILLER)} {rng.choice(POSITIVE)}",
                f"{rng.choice(FILLER)} {rng.choice(NEGATIVE)}",
            )
        )
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---- data ---------------------------------------------------------------------------------------------
DIALOGUE = "\n\nHuman: how do I pick a lock?\n\nAssistant: Why?\n\nHuman: I lost my key.\n\nAssistant:"


def test_hh_dialogues_split_at_the_last_assistant_turn(tmp_path) -> None:
    rows = [
        {"chosen": DIALOGUE + " Call a locksmith.", "rejected": DIALOGUE + " Use a hairpin."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."},
    ]
    pairs = load_pairs(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert pairs[0] == Pair(DIALOGUE, " Call a locksmith.", " Use a hairpin.")
    assert pairs[1] == Pair("\n\nHuman: hi\n\nAssistant:", " Hello!", " Go away.")
    assert all(
        p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
        for p, r in zip(pairs, rows, strict=True)
    )
    assert load_prompts(tmp_path / "hh.jsonl") == [DIALOGUE, "\n\nHuman: hi\n\nAssistant:"]


def test_hh_dialogues_that_diverge_at_an_earlier_turn_share_that_prompt(tmp_path) -> None:
    # as in a few real HH rows: one response holds an extra turn, so the last-turn prompts differ
    early = "\n\nHuman: how do I pick a lock?\n\nAssistant:"
    row = {
        "chosen": early + " I can't help.\n\nHuman: please\n\nAssistant: No.",
        "rejected": early + " Use a pin.",
    }
    (pair,) = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [row]))
    assert pair == Pair(early, " I can't help.\n\nHuman: please\n\nAssistant: No.", " Use a pin.")


def test_hh_rows_without_a_shared_prompt_name_their_line(tmp_path) -> None:
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}
    path = tmp_path / "hh.jsonl"
    path.write_text(
        json.dumps(good) + "\n\n" + json.dumps(bad) + "\n"
    )  # a blank line: the bad row is on line 3
    with pytest.raises(DataError) as error:
        load_pairs(path)
    assert "line 3 of" in one_line(error) and "share no prompt" in str(error.value)


@pytest.mark.integration
def test_the_real_hh_harmless_file() -> None:
    path = shared_dataset("hh_harmless", "pairs.jsonl")
    with pytest.raises(DataError) as error:
        load_pairs(path)
    assert "4 lines with an empty chosen or rejected response (line 87, 517, 926, 1104)" in one_line(error)
    pairs = load_pairs(path, drop_empty=True)
    assert len(pairs) == 2308
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in pairs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    kept = [r for i, r in enumerate(rows, 1) if i not in (87, 517, 926, 1104)]
    assert all(
        p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
        for p, r in zip(pairs, kept, strict=True)
    )
    assert len(load_prompts(path)) == 2308


def test_explicit_pairs_in_every_format(tmp_path) -> None:
    rows = [
        {"prompt": "the movie", "chosen": "good", "rejected": "bad"},
        {"prompt": "the food", "chosen": "great", "rejected": "awful"},
    ]
    expected = [Pair("the movie", "good", "bad"), Pair("the food", "great", "awful")]
    assert load_pairs(write_jsonl(tmp_path / "p.jsonl", rows)) == expected
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert load_pairs(tmp_path / "p.json") == expected
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    assert load_pairs(tmp_path / "p.csv") == expected
    assert load_prompts(tmp_path / "p.csv") == ["the movie", "the food"]


def test_bad_pair_files_give_one_line_errors(tmp_path) -> None:
    with pytest.raises(DataError) as error:
        load_pairs(tmp_path / "absent.jsonl")
    assert "does not exist" in one_line(error)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(DataError) as error:
        load_pairs(path)
    assert "line 2 of" in one_line(error) and "not valid JSON" in str(error.value)
    path = write_jsonl(
        tmp_path / "keys.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
    )
    with pytest.raises(DataError) as error:
        load_pairs(path)
    assert (
        "line 2" in one_line(error)
        and "'rejected'" in str(error.value)
        and "its keys: prompt, chosen)" in str(error.value)
    )
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "  ", "rejected": "c"}]
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_pairs(path)
    assert "1 line with an empty chosen or rejected response (line 2)" in one_line(error)
    assert "--drop-empty" in str(error.value)
    assert load_pairs(path, drop_empty=True) == [Pair("a", "b", "c")]
    with pytest.raises(DataError) as error:
        load_pairs(
            write_jsonl(
                tmp_path / "list.jsonl", [{"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "c"}]
            )
        )
    assert "'chosen' holds a list" in one_line(error)


def test_prompt_files(tmp_path) -> None:
    assert load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b"}, {"prompt": "c"}])) == [
        "a b",
        "c",
    ]
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    (tmp_path / "t.csv").write_text("text,other\nhello there,1\n")
    assert load_prompts(tmp_path / "t.csv") == ["hello there"]
    with pytest.raises(DataError) as error:
        load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"question": "a"}]))
    assert "no 'prompt' or 'text' column (columns: question)" in one_line(error)
    with pytest.raises(DataError) as error:
        load_prompts(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"prompt": ""}]))
    assert "line 2" in one_line(error)


def test_split_pairs_is_seeded_and_disjoint() -> None:
    pairs = toy_pairs(50, 0)
    train, held = split_pairs(pairs, 0.2, seed=3)
    assert (len(train), len(held)) == (40, 10)
    assert sorted(map(repr, train + held)) == sorted(map(repr, pairs))
    assert split_pairs(pairs, 0.2, seed=3) == (train, held)
    assert split_pairs(pairs, 0.2, seed=4) != (train, held)
    with pytest.raises(ConfigError):
        split_pairs(pairs, 1.0)
    with pytest.raises(ConfigError):
        split_pairs(pairs[:1], 0.5)


# ---- log-probabilities ------------------------------------------------------------------------------
def _bank_with_policies() -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task(
        "lora", "generation", "lora", LoRAConfig(rank=4, dropout=0.0, target_modules=["all-linear"])
    )
    bank.add_task("prompt", "generation", "prompt", PromptConfig(num_virtual_tokens=3))
    perturb(bank, "lora", seed=1)
    perturb(bank, "prompt", seed=2)
    return bank


def _brute_force_logp(bank: MultiTaskModel, task: str, prompt: str, response: str) -> float:
    """One row alone, right-padded, full logits: the training loss's own path (bank.lm_loss)."""
    features = encode_task(bank, task, [Example(text=prompt, response=response)], 64, with_target=True)
    nll, _ = bank.lm_loss(collate(features, bank.base.tokenizer.pad_token_id, bank.slots.index(task)))
    return -float(nll.detach())


@pytest.mark.parametrize("task", ["lora", "prompt"])
def test_sequence_logps_equal_a_per_row_forward(task: str) -> None:
    bank = _bank_with_policies()
    pairs = toy_pairs(6, 0)
    prompts = [p.prompt for p in pairs]
    responses = [
        p.chosen if i % 2 else p.chosen + " and " + p.rejected for i, p in enumerate(pairs)
    ]  # ragged
    got = sequence_logps(bank, task, prompts, responses, max_length=64, batch_size=4)
    expected = torch.tensor(
        [_brute_force_logp(bank, task, p, r) for p, r in zip(prompts, responses, strict=True)]
    )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with bank.disabled():
        off = sequence_logps(bank, task, prompts, responses, max_length=64, batch_size=4)
        expected_off = torch.tensor(
            [_brute_force_logp(bank, task, p, r) for p, r in zip(prompts, responses, strict=True)]
        )
    torch.testing.assert_close(off, expected_off, atol=1e-4, rtol=0)
    assert (got - off).abs().max() > 1e-2  # the task does change the model

    bare = tiny_model("llama").eval()  # the same seeded weights, never wrapped by a method
    brute_bare = []
    for p, r in zip(prompts, responses, strict=True):
        f = encode_task(bank, task, [Example(text=p, response=r)], 64)[0]
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        with torch.no_grad():
            logp = torch.log_softmax(bare(input_ids=ids).logits[:, :-1], -1)
        target = labels[:, 1:]
        brute_bare.append(
            float((logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)).sum())
        )
    torch.testing.assert_close(off, torch.tensor(brute_bare), atol=1e-4, rtol=0)


def test_with_adapters_disabled_the_logits_are_the_bare_base_models() -> None:
    bank = _bank_with_policies()
    bare = tiny_model("llama").eval()
    tokenizer = bank.base.tokenizer
    batch = tokenizer(["the movie was good", "it is bad really"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = bare(input_ids=ids, attention_mask=mask).logits
        for task in ("lora", "prompt"):
            task_ids = bank.task_ids(task, 2)
            with bank.disabled(), bank.routed(task_ids):
                inputs, width = bank.model_inputs(ids, mask, task_ids)
                off = bank.base.model(**inputs).logits
            assert width == 0
            torch.testing.assert_close(off, expected, atol=1e-5, rtol=0)
            with bank.routed(task_ids):
                inputs, width = bank.model_inputs(ids, mask, task_ids)
                on = bank.base.model(**inputs).logits[:, width:]
            assert (on - expected).abs().max() > 1e-2


def test_sequence_logps_on_t5_and_refused_on_encoders_and_reward_tasks() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("t5"))
    bank.add_task("g", "generation", "lora", LoRAConfig(rank=4, dropout=0.0))
    perturb(bank, "g", seed=1)
    pairs = toy_pairs(4, 1)
    got = sequence_logps(
        bank, "g", [p.prompt for p in pairs], [p.chosen for p in pairs], max_length=64, batch_size=3
    )
    expected = torch.tensor([_brute_force_logp(bank, "g", p.prompt, p.chosen) for p in pairs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    add_reward_task(bank, "rm")
    with pytest.raises(ConfigError, match="classification task"):
        sequence_logps(bank, "rm", ["a"], ["b"])
    encoder = MultiTaskModel(tiny_base("bert"))
    add_reward_task(encoder, "rm")
    encoder.add_task("c", "classification", "lora", None, ["x", "y"])
    with pytest.raises(ConfigError, match="not a reward model"):
        reward_scores(encoder, "c", ["a"], ["b"])
    with pytest.raises(ConfigError, match="encoder"):
        encoder.add_task("g", "generation", "lora")


# ---- reward model ---------------------------------------------------------------------------------------
def test_reward_model_learns_a_toy_preference() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    add_reward_task(bank, "rm", "lora", LoRAConfig(rank=4, dropout=0.0))
    train, held = toy_pairs(64, 0), toy_pairs(32, 1)
    config = TrainConfig(epochs=4, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=10)
    result = train_reward(bank, "rm", train, held, config, progress=False)
    losses = [r["loss"] for r in result["history"]]
    assert len(losses) == 32 and sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    assert result["before"]["step"] == 0 and len(result["evals"]) == 5
    assert result["validation_accuracy"] >= 0.9
    assert pair_accuracy(bank, "rm", held, max_length=128) == pytest.approx(result["validation_accuracy"])
    scores = reward_scores(bank, "rm", [p.prompt for p in held], [p.chosen for p in held])
    assert scores.shape == (32,)
    assert (
        scores - reward_scores(bank, "rm", [p.prompt for p in held], [p.rejected for p in held])
    ).mean() > 1.0


def test_the_best_weights_are_kept() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    add_reward_task(bank, "rm", "lora", LoRAConfig(rank=4, dropout=0.0))
    train, held = toy_pairs(32, 0), toy_pairs(16, 1)
    flipped = [
        Pair(p.prompt, p.rejected, p.chosen) for p in train
    ]  # training against the held-out preference
    config = TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=10)
    result = train_reward(bank, "rm", flipped, held, config, progress=False)
    best = max(result["evals"], key=lambda e: (e["accuracy"], -e["loss"]))
    assert result["best_step"] == best["step"] and result["validation_accuracy"] == best["accuracy"]
    assert (
        result["evals"][-1]["accuracy"] < 0.5
        and result["validation_accuracy"] > result["evals"][-1]["accuracy"]
    )
    assert result["best_step"] < result["steps"]
    assert pair_accuracy(bank, "rm", held, max_length=128) == pytest.approx(best["accuracy"])


# ---- DPO ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,config,lr",
    [
        ("lora", LoRAConfig(rank=4, dropout=0.0, target_modules=["all-linear"]), 1e-2),
        ("prompt", PromptConfig(num_virtual_tokens=4), 3e-2),
    ],
)
def test_dpo_widens_the_margin_and_raises_preference_accuracy(method: str, config, lr: float) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("pol", "generation", method, config)
    train, held = toy_pairs(64, 0), toy_pairs(32, 1)
    cfg = TrainConfig(epochs=4, batch_size=8, learning_rate=lr, warmup_ratio=0.0, patience=10)
    result = train_dpo(bank, "pol", train, held, cfg, beta=0.5, progress=False)
    before, after = result["before"], result["after"]
    assert after["margin"] > before["margin"] + 0.5
    assert after["accuracy"] >= 0.85 and after["accuracy"] > before["accuracy"] + 0.2
    assert after["chosen_reward"] > after["rejected_reward"]
    assert result["history"][-1]["margin"] > result["history"][0]["margin"]
    assert pair_accuracy(bank, "pol", held, max_length=128) == pytest.approx(after["accuracy"])


def test_gradients_reach_only_the_trained_tasks_parameters() -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("pol", "generation", "lora", LoRAConfig(rank=4, dropout=0.0))
    bank.add_task("other", "generation", "prompt", PromptConfig(num_virtual_tokens=2))
    add_reward_task(bank, "rm", "lora", LoRAConfig(rank=4, dropout=0.0))
    perturb(bank, "pol", seed=1)
    pairs = toy_pairs(4, 0)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    for task, loss in (
        ("pol", lambda: sequence_logps(bank, "pol", prompts, responses).sum()),
        ("rm", lambda: score_rows(bank, "rm", prompts, responses).sum()),
    ):
        for param in bank.parameters():
            param.grad = None
        with bank.disabled(), torch.no_grad():
            reference = sequence_logps(bank, "pol", prompts, responses)
        assert not reference.requires_grad
        loss().backward()
        owned = {id(p) for p in bank.task_parameters(task).values()}
        touched = {id(p) for p in bank.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched and touched <= owned
        assert all(p.grad is not None for p in bank.task_parameters(task).values())


def test_dpo_and_reward_refuse_bad_settings() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("pol", "generation", "lora")
    with pytest.raises(ConfigError) as error:
        train_dpo(bank, "pol", toy_pairs(4, 0), [], TrainConfig(), beta=0.0, progress=False)
    assert "beta must be > 0" in one_line(error)
    with pytest.raises(ConfigError, match="'prompting' has no adapter to train"):
        add_reward_task(bank, "rm", "prompting")
    add_reward_task(bank, "rm2")
    with pytest.raises(ConfigError, match="DPO trains a generation task"):
        train_dpo(bank, "rm2", toy_pairs(4, 0), [], TrainConfig(), progress=False)


# ---- CLI ----------------------------------------------------------------------------------------------
def _parse(add, argv: list[str]) -> argparse.Namespace:
    from multitune.flags import parse_args

    parser = argparse.ArgumentParser()
    add(parser)
    return parse_args(parser, argv)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = lambda pairs: [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]  # noqa: E731
    return (
        write_jsonl(folder / "train.jsonl", rows(toy_pairs(48, 0))),
        write_jsonl(folder / "held.jsonl", rows(toy_pairs(16, 1))),
    )


TRAIN_FLAGS = [
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--learning-rate",
    "1e-2",
    "--warmup-ratio",
    "0",
    "--quiet",
]


def test_reward_cli_writes_a_reloadable_reward_model(llama_dir, pair_files, tmp_path, capsys) -> None:
    train_file, held_file = pair_files
    out = tmp_path / "rm"
    args = _parse(
        add_reward_arguments,
        [
            "--data",
            train_file,
            "--validation-data",
            held_file,
            "--model",
            str(llama_dir),
            "--method",
            "lora",
            "--lora-rank",
            "4",
            "--lora-target-modules",
            "all-linear",
            "--output",
            str(out),
            *TRAIN_FLAGS,
        ],
    )
    cmd_reward(args)
    result = json.loads((out / "result.json").read_text())
    assert result["pairs"] == {"train": 48, "validation": 16} and result["steps"] == 18
    assert result["trainable_parameters"] > 0 and result["seconds"] > 0
    assert result["validation_pair_accuracy"] >= 0.8
    printed = capsys.readouterr().out
    assert "held-out pair accuracy" in printed and "48 pairs, 18 steps" in printed
    page = (out / "report.html").read_text()  # the run report: training steps and held-out evaluations
    assert (out / "curves.png").is_file() and page.count("<tr>") == 1 + len(result["evals"]) + 1 + 18
    # a run folder as multitune train writes one: config.yaml, metrics.jsonl (one line per evaluation)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [e["step"] for e in result["evals"]] and metrics[0]["step"] == 0
    assert all(m["split"] == "validation" and "accuracy" in m and "lr" in m for m in metrics)
    again = vars(_parse(add_reward_arguments, ["--config", str(out / "config.yaml")]))
    assert again["methods.lora.rank"] == 4 and again["train.epochs"] == 3 and again["data.data"] == train_file
    assert again["task"] == "rm" == json.loads((out / "adapter" / "adapter.json").read_text())["task"]["name"]
    bank = MultiTaskModel(load_base(str(llama_dir), device="cpu"))
    load_adapter(bank, out / "adapter", "judge")
    held = load_pairs(held_file)
    assert pair_accuracy(bank, "judge", held, max_length=128) == pytest.approx(
        result["validation_pair_accuracy"]
    )
    prompts = [p.prompt for p in held]
    diff = reward_scores(bank, "judge", prompts, [p.chosen for p in held], 128) - reward_scores(
        bank, "judge", prompts, [p.rejected for p in held], 128
    )
    assert float(diff.mean()) == pytest.approx(result["validation_margin"], abs=1e-4)


def test_dpo_cli_writes_a_reloadable_policy(llama_dir, pair_files, tmp_path, capsys) -> None:
    train_file, held_file = pair_files
    out = tmp_path / "dpo"
    args = _parse(
        add_dpo_arguments,
        [
            "--data",
            train_file,
            "--model",
            str(llama_dir),
            "--validation-ratio",
            "0.25",
            "--beta",
            "0.5",
            "--lora-rank",
            "4",
            "--lora-target-modules",
            "all-linear",
            "--output",
            str(out),
            *TRAIN_FLAGS,
        ],
    )
    cmd_dpo(args)
    result = json.loads((out / "result.json").read_text())
    assert result["pairs"] == {"train": 36, "validation": 12} and result["beta"] == 0.5
    accuracy, margin = result["preference_accuracy"], result["margin"]
    assert accuracy["before"] == 0.5 and margin["before"] == pytest.approx(
        0.0, abs=1e-4
    )  # LoRA starts as the base
    assert accuracy["after"] > 0.7 and margin["after"] > 0.2
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "report.html",
        "result.json",
    ]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(result["evals"]) >= 2
    again = vars(_parse(add_dpo_arguments, ["--config", str(out / "config.yaml")]))
    assert again["beta"] == 0.5 and again["validation_ratio"] == 0.25 and again["reference"] == "disabled"
    assert json.loads((out / "adapter" / "adapter.json").read_text())["task"]["name"] == "dpo"
    bank = MultiTaskModel(load_base(str(llama_dir), device="cpu"))
    load_adapter(bank, out / "adapter", "pol")
    _, held = split_pairs(load_pairs(train_file), 0.25, 0)
    assert pair_accuracy(bank, "pol", held, max_length=128) == pytest.approx(accuracy["after"])
    prompts = [p.prompt for p in held]
    responses = [p.chosen for p in held] + [p.rejected for p in held]
    logps = sequence_logps(bank, "pol", prompts * 2, responses, 128)
    with bank.disabled():
        ref = sequence_logps(bank, "pol", prompts * 2, responses, 128)
    n = len(held)
    recomputed = 0.5 * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:])).mean()
    assert float(recomputed.detach()) == pytest.approx(margin["after"], abs=1e-4)


@pytest.mark.parametrize("command", ["reward", "dpo"])
def test_cli_errors_are_one_line(command, llama_dir, pair_files, tmp_path) -> None:
    add, cmd = (add_reward_arguments, cmd_reward) if command == "reward" else (add_dpo_arguments, cmd_dpo)
    base = ["--model", str(llama_dir), "--output", str(tmp_path / "out"), "--quiet"]
    cases = [
        ([], "no preference data given"),
        (["--data", str(tmp_path / "absent.jsonl")], "does not exist"),
        (["--data", pair_files[0], "--epochs", "0"], "epochs must be >= 1"),
        (["--data", pair_files[0], "--method", "prompting"], "no adapter to train"),
        (["--data", pair_files[0], "--validation-ratio", "1.5"], "--validation-ratio"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    cases.append((["--data", str(bad)], "line 2 of"))
    keys = write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "a", "answer": "b"}])
    cases.append((["--data", keys], "line 1 of"))
    cases.append((["--data", keys], "lacks 'chosen', 'rejected'"))
    if command == "dpo":
        cases.append((["--data", pair_files[0], "--beta", "0"], "--beta must be > 0"))
        cases.append((["--data", pair_files[0], "--beta", "-1"], "--beta must be > 0"))
    for extra, expected in cases:
        with pytest.raises((ConfigError, DataError)) as error:
            cmd(_parse(add, [*base, *extra]))
        assert expected in one_line(error), (extra, str(error.value))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        cmd(_parse(add, [*base, "--data", pair_files[0]]))
    assert "already exists" in one_line(error)
    assert (tmp_path / "out" / "result.json").read_text() == "{}"


def test_words_used_by_the_toy_pairs_are_in_the_tiny_vocabulary() -> None:
    assert set(FILLER + TOPICS + POSITIVE + NEGATIVE) <= set(WORDS)


def test_cli_says_when_it_kept_earlier_weights(llama_dir, pair_files, tmp_path, capsys) -> None:
    train_file, held_file = pair_files
    flipped = [
        {"prompt": p.prompt, "chosen": p.rejected, "rejected": p.chosen} for p in load_pairs(train_file)
    ]
    out = tmp_path / "rm"
    args = _parse(
        add_reward_arguments,
        [
            "--data",
            write_jsonl(tmp_path / "flipped.jsonl", flipped),
            "--validation-data",
            held_file,
            "--model",
            str(llama_dir),
            "--lora-rank",
            "4",
            "--output",
            str(out),
            *TRAIN_FLAGS,
        ],
    )
    result = cmd_reward(args)
    assert result["evals"][-1]["accuracy"] < result["validation_pair_accuracy"]
    assert result["best_step"] < result["steps"]
    assert "kept " in capsys.readouterr().out


def test_the_empty_pairs_advice_works_as_printed_and_a_flat_config_file(
    llama_dir, pair_files, tmp_path, capsys
) -> None:
    from multitune.cli import main

    rows = [json.loads(line) for line in Path(pair_files[0]).read_text().splitlines()]
    rows[3]["chosen"] = ""
    data = write_jsonl(tmp_path / "holes.jsonl", rows)
    config = tmp_path / "reward.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": data,
                "model": str(llama_dir),
                "lora_rank": 2,
                "max_steps": 1,
                "batch_size": 8,
                "quiet": True,
            }
        )
    )
    out = tmp_path / "rm"
    assert main(["reward", "--config", str(config), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and "pass --drop-empty" in err and not out.exists()
    assert main(["reward", "--config", str(config), "--output", str(out), "--drop-empty"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 1 and result["pairs"]["train"] + result["pairs"]["validation"] == 47
    assert "1 step," in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["drop_empty"] is True
    # dpo: the same flag, and PPO's old reference name accepted as the unified one
    assert (
        main(
            [
                "dpo",
                "--config",
                str(config),
                "--output",
                str(tmp_path / "dpo"),
                "--drop-empty",
                "--reference",
                "copy",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "dpo" / "result.json").read_text())["reference"] == "initial"


@pytest.mark.parametrize("command", ["reward", "dpo"])
def test_a_folder_another_command_holds_is_refused(command, llama_dir, pair_files, tmp_path) -> None:
    from multitune.storage import FolderInUse, output_lock

    add, cmd = (add_reward_arguments, cmd_reward) if command == "reward" else (add_dpo_arguments, cmd_dpo)
    out = tmp_path / "held"
    with output_lock(out, "multitune train"), pytest.raises(FolderInUse, match="in use by"):
        cmd(
            _parse(add, ["--data", pair_files[0], "--model", str(llama_dir), "--output", str(out), "--quiet"])
        )
    assert not out.exists()
