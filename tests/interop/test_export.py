"""multitune export --format merged: plain Hugging Face folders that transformers loads without multitune."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturb, tiny_base
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.errors import ConfigError
from multitune.interop.export import export_merged
from multitune.methods.lora import LoRAConfig
from multitune.storage import save_adapter

TEXTS = ["good great film", "bad awful the movie was boring", "fun", "the plot was bad but fun"]


def _bank(family: str, kind: str, method: str, config=None) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    torch.manual_seed(1)
    bank.add_task("t", kind, method, config, ["neg", "pos", "meh"] if kind == "classification" else None)
    perturb(bank, "t", seed=3)
    return bank


def _batch(bank: MultiTaskModel, side: str = "right") -> dict[str, torch.Tensor]:
    tokenizer = bank.base.tokenizer
    tokenizer.padding_side = side
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


CLASSIFIERS = [
    ("bert", "lora", None),
    ("bert", "ia3", None),
    ("bert", "full", None),
    ("bert", "base", None),
    ("llama", "lora", LoRAConfig(rank=4, use_dora=True)),
    ("llama", "ia3", None),
    ("gpt2", "lora", None),
    ("t5", "lora", None),
]


@pytest.mark.parametrize(("family", "method", "config"), CLASSIFIERS)
def test_a_merged_classifier_predicts_as_multitune(family, method, config, tmp_path) -> None:
    bank = _bank(family, "classification", method, config)
    side = "left" if family in ("llama", "gpt2") else "right"
    batch = _batch(bank, side)
    with torch.no_grad():
        ours = bank.classify(batch["input_ids"], batch["attention_mask"], bank.task_ids("t", len(TEXTS)))
    export_merged(bank, "t", tmp_path / "plain")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", trust_remote_code=True)
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "meh"}
    with torch.no_grad():
        theirs = model.eval()(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.parametrize(
    ("family", "method", "config"),
    [
        ("llama", "lora", None),
        ("llama", "lora", LoRAConfig(rank=4, use_dora=True)),
        ("gpt2", "ia3", None),
        ("llama", "full", None),
        ("t5", "lora", None),
    ],  # fmt: skip
)
def test_a_merged_generator_is_the_plain_architecture_with_the_same_logits(
    family, method, config, tmp_path
) -> None:
    bank = _bank(family, "generation", method, config)
    batch = _batch(bank)
    rows = bank.task_ids("t", len(TEXTS))
    seq2seq = family == "t5"
    extra = {"decoder_input_ids": torch.zeros_like(batch["input_ids"][:, :2])} if seq2seq else {}
    with torch.no_grad():
        ours = bank.run(batch["input_ids"], batch["attention_mask"], rows, **extra).out.logits
    export_merged(bank, "t", tmp_path / "plain")
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path / "plain")
    assert type(model).__module__.startswith("transformers.")  # no custom code for a generation task
    assert not (tmp_path / "plain" / "modeling_multitune.py").exists()
    with torch.no_grad():
        positions = {} if seq2seq else {"position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
        theirs = model.eval()(**batch, **extra, **positions).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "reason"),
    [
        ("prompt", "--format peft carries them"),
        ("prefix", "--format peft carries them"),
        ("adapter", "nonlinear"),
    ],  # fmt: skip
)
def test_methods_that_do_not_fold_are_refused_with_the_reason(method, reason, tmp_path) -> None:
    bank = _bank("llama", "generation", method)
    with pytest.raises(ConfigError, match=reason):
        export_merged(bank, "t", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_cli_export_merged_and_peft(llama_dir, tmp_path, capsys) -> None:
    from multitune.models import load_base

    bank = MultiTaskModel(load_base(str(llama_dir), device="cpu"))
    bank.add_task("t", "classification", "lora", None, ["neg", "pos"])
    perturb(bank, "t", seed=2)
    save_adapter(bank, "t", tmp_path / "adapter")
    batch = _batch(bank, "left")
    with torch.no_grad():
        ours = bank.classify(batch["input_ids"], batch["attention_mask"], bank.task_ids("t", len(TEXTS)))
    assert (
        main(["export", str(tmp_path / "adapter"), "--format", "merged", "--output", str(tmp_path / "m")])
        == 0
    )
    out = capsys.readouterr().out
    assert "trust_remote_code=True" in out and "labels neg, pos" in out
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, ours, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["multitune_task"]["method"] == "lora" and config["label2id"] == {"neg": 0, "pos": 1}
    assert (
        main(["export", str(tmp_path / "adapter"), "--format", "peft", "--output", str(tmp_path / "p")]) == 0
    )
    assert (tmp_path / "p" / "adapter_config.json").is_file()


def test_cli_export_refusals_are_one_line_and_write_nothing(llama_dir, tmp_path, capsys) -> None:
    from multitune.models import load_base

    bank = MultiTaskModel(load_base(str(llama_dir), device="cpu"))
    bank.add_task("t", "generation", "prompt")
    save_adapter(bank, "t", tmp_path / "adapter")
    capsys.readouterr()
    assert (
        main(["export", str(tmp_path / "adapter"), "--format", "merged", "--output", str(tmp_path / "m")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--format peft" in err
    assert not (tmp_path / "m").exists()
    assert (
        main(["export", str(tmp_path / "missing"), "--format", "merged", "--output", str(tmp_path / "m")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "adapter"), "--format", "onnx", "--output", str(tmp_path / "m")])
