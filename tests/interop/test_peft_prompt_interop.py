"""PEFT folder format for prompt tuning and prefix tuning: export -> peft package, peft package -> import."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_base, tiny_model

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.interop.peft import export_peft, import_peft
from multitune.methods.prefix import PrefixConfig, encoders
from multitune.methods.prompt import PromptConfig

peft = pytest.importorskip("peft")

CASES = [
    ("prompt", "llama"),
    ("prompt", "gpt2"),
    ("prompt", "bert"),
    ("prompt", "t5"),
    ("prefix", "llama"),
    ("prefix", "gpt2"),
    ("prefix", "bert"),
]


def _bank(method: str, family: str) -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    config = (
        PrefixConfig(num_virtual_tokens=3, projection=False)
        if method == "prefix"
        else PromptConfig(num_virtual_tokens=3, init="random")
    )
    bank.add_task(
        "t",
        "classification" if family == "bert" else "generation",
        method,
        config,
        ["a", "b"] if family == "bert" else None,
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in bank.task_parameters("t").values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return bank


def _ours(bank: MultiTaskModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The base model's outputs over the text positions with the task's prompt or prefixes."""
    rows = bank.task_ids("t", ids.shape[0])
    with torch.no_grad(), bank.routed(rows):
        inputs, width = bank.model_inputs(ids, mask, rows)
        if bank.base.arch == "seq2seq":
            return bank.base.model(**inputs, decoder_input_ids=torch.zeros_like(ids[:, :1])).logits
        out = bank.base.model(**inputs)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[:, width:]


def _theirs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, seq2seq: bool) -> torch.Tensor:
    with torch.no_grad():
        if seq2seq:
            return model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros_like(ids[:, :1])
            ).logits
        out = model(input_ids=ids, attention_mask=mask)
        full = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return full[:, -ids.shape[1] :]  # PEFT's prompt tuning returns the virtual positions too


def _inputs(bank: MultiTaskModel) -> tuple[torch.Tensor, torch.Tensor]:
    enc = bank.base.tokenizer(
        ["good movie", "the film was very bad and not nice"], padding=True, return_tensors="pt"
    )
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize(("method", "family"), CASES)
def test_exported_adapter_gives_the_same_outputs_in_the_peft_package(
    method: str, family: str, tmp_path
) -> None:
    bank = _bank(method, family)
    export_peft(bank, "t", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[method]
    reference = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "peft").eval()
    ids, mask = _inputs(bank)
    ours, theirs = _ours(bank, ids, mask), _theirs(reference, ids, mask, family == "t5")
    real = mask.bool() if family != "t5" else torch.ones(ids.shape[0], 1, dtype=torch.bool)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    plain = _theirs(tiny_model(family).eval(), ids, mask, family == "t5")
    assert (ours[real] - plain[real]).abs().max() > 1e-3  # the adapter really changes the outputs


@pytest.mark.parametrize(("method", "family"), CASES)
def test_a_peft_adapter_imports_with_the_same_outputs(method: str, family: str, tmp_path) -> None:
    ours = _bank(method, family)
    export_peft(ours, "t", tmp_path / "a")
    reference = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "a").eval()
    reference.save_pretrained(tmp_path / "b")  # written by the peft package itself
    other = MultiTaskModel(tiny_base(family))
    import_peft(
        other,
        tmp_path / "b",
        "t",
        "classification" if family == "bert" else "generation",
        ["a", "b"] if family == "bert" else None,
    )
    ids, mask = _inputs(other)
    theirs = _theirs(reference, ids, mask, family == "t5")
    real = mask.bool() if family != "t5" else torch.ones(ids.shape[0], 1, dtype=torch.bool)
    torch.testing.assert_close(_ours(other, ids, mask)[real], theirs[real], atol=1e-5, rtol=0)


def test_prefix_export_refuses_t5_and_import_refuses_a_foreign_base(tmp_path) -> None:
    bank = MultiTaskModel(tiny_base("t5"))
    bank.add_task("t", "generation", "prefix", PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="T5"):
        export_peft(bank, "t", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    export_peft(_bank("prefix", "llama"), "t", tmp_path / "llama")
    gpt2 = MultiTaskModel(tiny_base("gpt2"))
    with pytest.raises(ConfigError, match="another base"):
        import_peft(gpt2, tmp_path / "llama", "t")
    assert not gpt2.tasks and not encoders(gpt2)  # nothing half-added


def test_import_of_folders_that_are_not_usable_peft_adapters(tmp_path) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        import_peft(bank, tmp_path, "t")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(ConfigError, match="PEFT LOHA adapter; import covers"):
        import_peft(bank, tmp_path, "t")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2})
    )
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="never loads"):
        import_peft(bank, tmp_path, "t")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        import_peft(bank, tmp_path, "t")
