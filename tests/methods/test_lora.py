"""LoRA: parity with the peft package, merge/unmerge, scaling, targets, mixed-batch routing, storage."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, tiny_base, tiny_model, word_tokenizer

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig, LoRALinear
from multitune.storage import load_adapter, save_adapter

PEFT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
}
TEXTS = ["good movie", "the film was very bad and not nice", "what"]


def _batch(base, n=3):
    enc = base.tokenizer(TEXTS[:n], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _randomize(bank: MultiTaskModel, task: str, seed: int = 1) -> None:
    """Give a task non-zero LoRA weights (B starts at zero, which would make every test trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.task_parameters(task).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _outputs(model, arch: str, ids, mask):
    if arch == "seq2seq":
        decoder = torch.zeros((ids.shape[0], 2), dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_same_weights_give_the_same_outputs_as_peft(family: str, rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=PEFT_TARGETS[family], rslora=rslora)
    bank.add_task(
        "t",
        "generation" if family != "bert" else "classification",
        "lora",
        config,
        labels=None if family != "bert" else ["a", "b"],
    )
    _randomize(bank, "t")

    reference = peft.get_peft_model(
        tiny_model(family),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=PEFT_TARGETS[family],
            use_rslora=rslora,
            fan_in_fan_out=family == "gpt2",
        ),
    )
    from multitune.interop.peft import to_peft_state_dict

    ours = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): v
        for k, v in to_peft_state_dict(bank, "t").items()
    }
    missing, unexpected = reference.load_state_dict(ours, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]
    reference.eval()
    bank.eval()

    ids, mask = _batch(base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", ids.shape[0])):
        got = _outputs(base.model, base.arch, ids, mask)
    with torch.no_grad():
        want = _outputs(reference, base.arch, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = _outputs(tiny_model(family), base.arch, ids, mask)
    assert (got - plain).abs().max() > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_gives_identical_outputs_and_unmerge_restores_the_base(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task(
        "t", "classification", "lora", LoRAConfig(rank=4, target_modules=["all-linear"]), ["a", "b"]
    )
    _randomize(bank, "t")
    bank.eval()
    ids, mask = _batch(base)
    rows = bank.task_ids("t", ids.shape[0])
    original = {k: v.clone() for k, v in base.model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        before = bank.classify(ids, mask, rows)
        bank.merge("t")
        merged = bank.classify(ids, mask, rows)
        with bank.disabled():  # with the adapter off, the merged base alone must give the same answer
            merged_base = bank.classify(ids, mask, rows)
        bank.unmerge("t")
        after = bank.classify(ids, mask, rows)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_base, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for key, value in base.model.state_dict().items():
        if key in original:
            torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_disabled_adapter_gives_the_original_base_outputs() -> None:
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    bank.add_task("t", "generation", "lora")
    _randomize(bank, "t")
    ids, mask = _batch(base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", 3)), bank.disabled():
        got = base.model(input_ids=ids, attention_mask=mask).logits
    want = tiny_model("llama")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    assert LoRAConfig(rank=16, alpha=8).scaling == pytest.approx(0.5)
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scaling == pytest.approx(2.0)


def test_only_the_tasks_own_parameters_train() -> None:
    base = tiny_base("bert")
    bank = MultiTaskModel(base)
    bank.add_task("t", "classification", "lora", LoRAConfig(rank=2), ["a", "b"])
    trainable = {id(p) for p in bank.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bank.task_parameters("t").values()}
    # every linear layer of the 2 blocks (not the pooler, which classification never reads): query, key,
    # value and attention output A (2x32) + B (32x2), intermediate 32->64 A (2x32) + B (64x2), output
    # 64->32 A (2x64) + B (32x2); plus a 32x2 head and its bias
    per_block = 4 * (64 + 64) + (64 + 128) + (128 + 64)
    assert sum(p.numel() for p in bank.task_parameters("t").values()) == 2 * per_block + 64 + 2
    assert not any(name.startswith("pooler.") for name in bank.task_parameters("t"))


def test_unknown_target_module_names_the_model_layers() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match=r"target modules qkv not found.*q_proj"):
        bank.add_task("t", "generation", "lora", LoRAConfig(target_modules=["qkv"]))
    assert "t" not in bank.tasks
    assert not any(isinstance(m, LoRALinear) for m in bank.modules())


@pytest.mark.parametrize("bad", [LoRAConfig(rank=0), LoRAConfig(dropout=1.5), LoRAConfig(alpha=0)])
def test_bad_lora_settings_are_refused(bad: LoRAConfig) -> None:
    with pytest.raises(ConfigError):
        MultiTaskModel(tiny_base("bert")).add_task("t", "classification", "lora", bad, ["a", "b"])


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_rows_equal_each_task_alone(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("a", "classification", "lora", LoRAConfig(rank=2), ["x", "y"])
    bank.add_task(
        "b", "classification", "lora", LoRAConfig(rank=6, target_modules=["all-linear"]), ["x", "y", "z"]
    )
    bank.add_task("c", "classification", "full" if False else "lora", LoRAConfig(rank=3), ["p", "q"])
    for i, task in enumerate("abc"):
        _randomize(bank, task, seed=i + 5)
    bank.eval()
    ids, mask = _batch(base)
    rows = torch.tensor([1, 0, 2])
    with torch.no_grad():
        mixed = bank.classify(ids, mask, rows)
        for r, slot in enumerate(rows.tolist()):
            alone = bank.classify(ids[r : r + 1], mask[r : r + 1], torch.tensor([slot]))
            n = alone.shape[1]
            torch.testing.assert_close(mixed[r : r + 1, :n], alone, atol=1e-5, rtol=0)
            assert torch.isinf(mixed[r, n:]).all()


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    base = tiny_base("gpt2")
    bank = MultiTaskModel(base)
    bank.add_task("t", "classification", "lora", LoRAConfig(rank=4), ["a", "b", "c"])
    _randomize(bank, "t")
    bank.eval()
    ids, mask = _batch(base)
    with torch.no_grad():
        want = bank.classify(ids, mask, bank.task_ids("t", 3))
    save_adapter(bank, "t", tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.json", "adapter.safetensors"]
    fresh = MultiTaskModel(tiny_base("gpt2"))
    spec = load_adapter(fresh, tmp_path / "adapter")
    assert spec.labels == ["a", "b", "c"]
    fresh.eval()
    with torch.no_grad():
        got = fresh.classify(ids, mask, fresh.task_ids("t", 3))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_removing_a_task_restores_plain_layers_and_keeps_the_others() -> None:
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    bank.add_task("a", "generation", "lora")
    bank.add_task("b", "generation", "lora", LoRAConfig(target_modules=["o_proj"]))
    _randomize(bank, "a")
    ids, mask = _batch(base)
    with torch.no_grad(), bank.routed(bank.task_ids("a", 3)):
        before = base.model(input_ids=ids, attention_mask=mask).logits
    bank.remove_task("b")
    assert not any(isinstance(m, LoRALinear) for n, m in base.model.named_modules() if n.endswith("o_proj"))
    with torch.no_grad(), bank.routed(bank.task_ids("a", 3)):
        after = base.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    bank.remove_task("a")
    assert not any(isinstance(m, LoRALinear) for m in base.model.modules())
    assert word_tokenizer() is not None


def test_mixed_forward_without_gradients_sees_weights_changed_in_place() -> None:
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    for task in ("a", "b"):
        bank.add_task(task, "classification", "lora", LoRAConfig(rank=2), ["x", "y"])
        _randomize(bank, task)
    ids, mask = _batch(base)
    rows = torch.tensor([0, 1, 0])
    with torch.no_grad():
        first = bank.classify(ids, mask, rows)  # builds and caches the stacked weights
        bank.task_parameters("a")["model.layers.0.self_attn.q_proj.lora_B.weight"].add_(
            0.5
        )  # an optimizer step
        second = bank.classify(ids, mask, rows)
        alone = bank.classify(ids[:1], mask[:1], bank.task_ids("a", 1))
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[:1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(query|value)$"])
def test_a_peft_adapter_with_all_linear_or_regex_targets_imports_and_exports_back(targets, tmp_path) -> None:
    """Which layers PEFT adapted is read from its tensors; an export names exactly those layers (BERT's
    'dense' suffix alone would also adapt the pooler)."""
    peft = pytest.importorskip("peft")
    from multitune.interop.peft import export_peft, import_peft

    torch.manual_seed(0)
    reference = peft.get_peft_model(
        tiny_model("bert"), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets)
    )
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    reference.save_pretrained(tmp_path / "peft")
    base = tiny_base("bert")
    bank = MultiTaskModel(base)
    import_peft(bank, tmp_path / "peft", "t", kind="classification", labels=["a", "b"])
    adapted = {k.rsplit(".lora_", 1)[0] for k in bank.task_parameters("t") if ".lora_" in k}
    assert adapted == {
        n.removeprefix("base_model.model.")
        for n, m in reference.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    reference.eval()
    bank.eval()
    ids, mask = _batch(base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", ids.shape[0])):
        got = _outputs(base.model, base.arch, ids, mask)
    with torch.no_grad():
        want = _outputs(reference, base.arch, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    export_peft(bank, "t", tmp_path / "back")
    again = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path / "back")
    assert {n for n, m in again.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A} == {
        n for n, m in reference.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def test_a_new_task_records_its_default_targets_and_an_older_adapter_without_them_loads_its_layers(
    tmp_path,
) -> None:
    """Default targets change with evidence (BERT's went from query/value to all-linear): a task records the
    targets it was built with, and an adapter saved before they were recorded (target_modules null) adapts
    the layers its tensors name, with the outputs it was saved with."""
    import json

    base = tiny_base("bert")
    bank = MultiTaskModel(base)
    bank.add_task("new", "classification", "lora", LoRAConfig(rank=2), ["a", "b"])
    assert bank.tasks["new"].config["target_modules"] == list(base.family.lora_targets)
    bank.add_task(
        "old", "classification", "lora", LoRAConfig(rank=2, target_modules=["query", "value"]), ["a", "b"]
    )
    _randomize(bank, "old")
    folder = save_adapter(bank, "old", tmp_path / "old")
    meta = json.loads((folder / "adapter.json").read_text())
    meta["task"]["config"]["target_modules"] = None  # as the adapters saved before targets were recorded
    (folder / "adapter.json").write_text(json.dumps(meta))
    bank.eval()
    ids, mask = _batch(base)
    with torch.no_grad():
        want = bank.classify(ids, mask, bank.task_ids("old", ids.shape[0]))
    fresh = MultiTaskModel(tiny_base("bert"))
    spec = load_adapter(fresh, folder, "back")
    fresh.eval()
    layers = {
        k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in fresh.task_parameters("back") if ".lora_" in k
    }
    assert layers == {"query", "value"}
    assert spec.config["target_modules"] is not None
    with torch.no_grad():
        got = fresh.classify(ids, mask, fresh.task_ids("back", ids.shape[0]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
