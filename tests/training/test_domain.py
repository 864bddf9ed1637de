"""Domain adaptation on raw text (multitune.domain): next-token loss on decoders, masked LM and SimCSE on
encoders, the saved task loading back, and every bad input refused in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import WORDS, save_tiny, tiny_model, word_tokenizer

from multitune import domain
from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.config import DataConfig, RunConfig, TrainConfig
from multitune.models import load_base
from multitune.storage import load_adapter
from multitune.training.evaluate import evaluate
from multitune.training.train import run


def _documents(path: Path, n: int = 48) -> Path:
    """A few sentences repeated: a 'domain' whose text a model can learn in a few steps."""
    rng = random.Random(0)
    sentences = [" ".join(rng.sample(WORDS, 6)) for _ in range(4)]
    path.write_text("\n".join(sentences[i % 4] for i in range(n)) + "\n")
    return path


@pytest.fixture(scope="module")
def mask_bert_dir(tmp_path_factory) -> Path:
    """A tiny BertModel (no MLM head) whose tokenizer has a [MASK] token (the shared helpers' has none)."""
    import transformers as t

    folder = tmp_path_factory.mktemp("tiny-bert-mask")
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    config = tiny_model("bert").config
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    t.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model: Path, data: Path, out: Path, **run: object) -> RunConfig:
    train = TrainConfig(
        epochs=6, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100, device="cpu", seed=0
    )
    return RunConfig(
        model=str(model), kind="domain", output=str(out), data=DataConfig(data=str(data)), train=train, **run
    )  # type: ignore[arg-type]


def _reloaded_test_scores(config: RunConfig) -> dict[str, float]:
    """The saved task on a fresh base, scored on the run's test split."""
    bank = MultiTaskModel(load_base(config.model, device="cpu"))
    spec = load_adapter(bank, Path(config.output) / "adapter")
    test = config.data.splits("domain").test
    return evaluate(bank, spec.name, test, config.train.max_length, config.train.eval_batch_size)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_next_token_domain_training_lowers_held_out_loss_and_reloads(family, tmp_path, one_thread) -> None:
    model = save_tiny(family, tmp_path / family)
    config = _config(model, _documents(tmp_path / "docs.txt"), tmp_path / "run")
    summary = run(config, progress=False)
    assert summary["objective"] == "clm"
    assert summary["test"]["loss"] < 0.8 * summary["test_before"]["loss"]
    assert summary["test"]["perplexity"] < summary["test_before"]["perplexity"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["test_before"] == summary["test_before"]
    again = _reloaded_test_scores(config)
    assert again["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)


def test_masked_lm_lowers_held_out_loss_and_reloads_through_the_cli(
    mask_bert_dir, tmp_path, capsys, one_thread
) -> None:
    data = tmp_path / "docs.csv"  # a table's text column works as a .txt file does
    lines = _documents(tmp_path / "docs.txt", 64).read_text().splitlines()
    data.write_text("id,text\n" + "".join(f"{i},{line}\n" for i, line in enumerate(lines)))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--kind",
            "domain",
            "--data",
            str(data),
            "--model",
            str(mask_bert_dir),
            "--output",
            str(out),
        ]
        + ["--epochs", "8", "--batch-size", "8", "--learning-rate", "1e-2", "--device", "cpu", "--quiet"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "domain (masked-LM): held-out perplexity" in printed
    summary = json.loads((out / "result.json").read_text())
    assert summary["objective"] == "mlm"
    assert summary["test"]["loss"] < 0.8 * summary["test_before"]["loss"]
    config = _config(mask_bert_dir, data, out)
    again = _reloaded_test_scores(config)
    assert again["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)
    assert any(k.startswith("head.transform.") for k in load_file_keys(out / "adapter"))


def load_file_keys(folder: Path) -> list[str]:
    from safetensors.torch import load_file

    return list(load_file(str(folder / "adapter.safetensors")))


def test_simcse_trains_without_a_head_and_reloads(mask_bert_dir, tmp_path, one_thread) -> None:
    config = _config(
        mask_bert_dir, _documents(tmp_path / "docs.txt"), tmp_path / "run", domain_objective="simcse"
    )
    config.train.epochs = 3
    summary = run(config, progress=False)
    assert summary["objective"] == "simcse" and set(summary["test"]) == {"loss"}
    assert not any(k.startswith("head.") for k in load_file_keys(tmp_path / "run" / "adapter"))
    assert _reloaded_test_scores(config)["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)


def test_bert_masking_follows_80_10_10_and_never_masks_special_tokens(mask_bert_dir) -> None:
    tokenizer = load_base(str(mask_bert_dir), device="cpu").tokenizer
    ids = tokenizer(" ".join(WORDS * 200)).input_ids  # [BOS] + 7,400 words
    out = domain.masked({"input_ids": ids}, tokenizer, torch.Generator().manual_seed(0))
    chosen = [i for i, label in enumerate(out["labels"]) if label != -100]
    assert 0 not in chosen and abs(len(chosen) / (len(ids) - 1) - 0.15) < 0.02
    masked = sum(out["input_ids"][i] == tokenizer.mask_token_id for i in chosen) / len(chosen)
    kept = sum(out["input_ids"][i] == ids[i] for i in chosen) / len(chosen)
    assert abs(masked - 0.8) < 0.04 and 0.07 < kept < 0.16  # 10% kept, plus random draws of the same token
    assert all(out["labels"][i] == ids[i] for i in chosen)


def test_a_checkpoint_with_an_mlm_head_starts_from_it(tmp_path) -> None:
    import transformers as t

    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    config = tiny_model("bert").config
    config.vocab_size = len(tokenizer)
    pretrained = t.BertForMaskedLM(config)
    with torch.no_grad():
        pretrained.cls.predictions.bias.normal_()
    pretrained.save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    bank = MultiTaskModel(load_base(str(tmp_path / "mlm"), device="cpu"))
    bank.add_task("d", "domain", "lora")
    params = bank.task_parameters("d")
    predictions = pretrained.cls.predictions
    assert torch.equal(params["head.bias"], predictions.bias)
    assert torch.equal(params["head.transform.dense.weight"], predictions.transform.dense.weight)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_each_with_the_fix(mask_bert_dir, tmp_path, capsys) -> None:
    base = ["train", "--kind", "domain", "--model", str(mask_bert_dir), "--device", "cpu", "--quiet"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "is empty; write one document per line" in _error(
        capsys, [*base, "--data", str(empty), "--output", str(tmp_path / "a")]
    )
    table = tmp_path / "no_text.csv"
    table.write_text("id,score\n1,2\n")
    err = _error(capsys, [*base, "--data", str(table), "--output", str(tmp_path / "b")])
    assert "no text column found" in err and "columns found: id, score" in err and "--text-column" in err
    docs = _documents(tmp_path / "docs.txt")
    err = _error(capsys, [*base, "--data", str(docs), "--label-column", "y", "--output", str(tmp_path / "c")])
    assert "--label-column" in err and "reads no labels" in err
    err = _error(
        capsys, [*base, "--data", str(docs), "--domain-objective", "clm", "--output", str(tmp_path / "d")]
    )
    assert "use mlm or simcse" in err
    t5 = save_tiny("t5", tmp_path / "t5")
    err = _error(
        capsys,
        [
            "train",
            "--kind",
            "domain",
            "--model",
            str(t5),
            "--data",
            str(docs),
            "--output",
            str(tmp_path / "e"),
        ],
    )
    assert "span corruption" in err
    err = _error(capsys, ["train", "--data", str(docs), "--model", str(t5), "--output", str(tmp_path / "f")])
    assert "only --kind domain reads" in err


def test_eval_and_predict_on_a_domain_task_say_what_it_is_for(
    llama_dir, tmp_path, capsys, one_thread
) -> None:
    config = _config(llama_dir, _documents(tmp_path / "docs.txt", 16), tmp_path / "run")
    config.train.epochs, config.data.keep_replay = 1, False
    run(config, progress=False)
    predict = ["predict", str(tmp_path / "run"), "--input", "x.csv", "--output", str(tmp_path / "p.csv")]
    for argv in (["eval", str(tmp_path / "run")], predict):
        err = _error(capsys, argv)
        assert "is a domain adapter" in err and "result.json" in err
