"""DoRA (LoRA with use_dora): parity with the peft package (outputs and gradients), mixed batches of DoRA,
LoRA and other tasks, merge/unmerge, saving, PEFT export/import, training, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, tiny_base, tiny_model, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig, LoRALinear
from multitune.storage import load_adapter, save_adapter

PEFT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc"],  # GPT-2's Conv1D layers: weights stored (in, out)
    "bert": ["query", "value"],
    "t5": ["q", "v"],
}
TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy and great", "not bad"]
KIND = {"llama": "generation", "gpt2": "generation", "bert": "classification", "t5": "generation"}


def _batch(base, n=3):
    enc = base.tokenizer(TEXTS[:n], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _randomize(bank: MultiTaskModel, task: str, seed: int = 1) -> None:
    """Non-zero A and B, and magnitudes off their initial ||W|| (else DoRA would equal LoRA)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in bank.task_parameters(task).items():
            noise = torch.randn(param.shape, generator=generator)
            if key.endswith("lora_magnitude_vector"):
                param.mul_(1 + 0.3 * noise)
            else:
                param.copy_(noise * 0.2)


def _outputs(model, arch: str, ids, mask):
    if arch == "seq2seq":
        decoder = torch.zeros((ids.shape[0], 2), dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _dora_bank(family: str, **config) -> tuple[MultiTaskModel, LoRAConfig]:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    cfg = LoRAConfig(
        **{
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": PEFT_TARGETS[family],
            "use_dora": True,
            **config,
        }
    )
    bank.add_task("t", KIND[family], "lora", cfg, labels=["a", "b"] if family == "bert" else None)
    _randomize(bank, "t")
    return bank, cfg


def _peft_reference(peft, family: str, cfg: LoRAConfig, bank: MultiTaskModel):
    from multitune.interop.peft import to_peft_state_dict

    reference = peft.get_peft_model(
        tiny_model(family),
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_rslora=cfg.rslora,
            use_dora=True,
            fan_in_fan_out=family == "gpt2",
        ),
    )
    ours = {
        k.replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight")
        .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"): v
        for k, v in to_peft_state_dict(bank, "t").items()
    }
    missing, unexpected = reference.load_state_dict(ours, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]
    return reference


def test_a_new_dora_task_starts_as_the_base_with_magnitudes_of_the_weight_rows() -> None:
    base = tiny_base("gpt2")
    bank = MultiTaskModel(base)
    bank.add_task("t", "generation", "lora", LoRAConfig(target_modules=["c_attn"], use_dora=True))
    keys = [k for k in bank.task_parameters("t") if k.endswith("lora_magnitude_vector")]
    assert keys == [f"transformer.h.{i}.attn.c_attn.lora_magnitude_vector" for i in range(2)]
    weight = tiny_model("gpt2").transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out)
    m = bank.task_parameters("t")[keys[0]]
    torch.testing.assert_close(m, weight.norm(dim=0), atol=1e-6, rtol=0)
    ids, mask = _batch(base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", 3)):
        got = base.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(
        got, tiny_model("gpt2").eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_same_weights_give_the_same_outputs_as_peft(family: str) -> None:
    peft = pytest.importorskip("peft")
    bank, cfg = _dora_bank(family, rslora=family == "llama")
    reference = _peft_reference(peft, family, cfg, bank)
    reference.eval()
    bank.eval()
    base = bank.base
    ids, mask = _batch(base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", ids.shape[0])):
        got = _outputs(base.model, base.arch, ids, mask)
    with torch.no_grad():
        want = _outputs(reference, base.arch, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # the same A and B as plain LoRA give another answer: the magnitudes count
        plain = peft.get_peft_model(
            tiny_model(family),
            peft.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=cfg.target_modules,
                use_rslora=cfg.rslora,
                fan_in_fan_out=family == "gpt2",
            ),
        )
        plain.load_state_dict(reference.state_dict(), strict=False)
        assert (_outputs(plain.eval(), base.arch, ids, mask) - got).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_equal_peft_s_with_the_norm_detached(family: str) -> None:
    """Gradients of A, B and m equal PEFT's: the norm ||W + s B A|| is a constant of the graph (section 4.3)."""
    peft = pytest.importorskip("peft")
    bank, cfg = _dora_bank(family)
    reference = _peft_reference(peft, family, cfg, bank)
    base = bank.base
    ids, mask = _batch(base)
    bank.eval()  # the base's own dropout (GPT-2 has some) off in both: their forwards must be comparable
    reference.eval()
    with bank.routed(bank.task_ids("t", ids.shape[0])):
        (_outputs(base.model, base.arch, ids, mask) ** 2).mean().backward()
    (_outputs(reference, base.arch, ids, mask) ** 2).mean().backward()
    theirs = dict(reference.named_parameters())
    for key, param in bank.task_parameters("t").items():
        peft_key = "base_model.model." + key.replace(".weight", ".default.weight").replace(
            "lora_magnitude_vector", "lora_magnitude_vector.default.weight"
        )
        assert param.grad is not None and param.grad.abs().max() > 0, key
        torch.testing.assert_close(param.grad, theirs[peft_key].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_of_dora_lora_and_other_tasks_equals_each_row_alone(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("dora", "classification", "lora", LoRAConfig(rank=2, use_dora=True), ["x", "y"])
    bank.add_task(
        "lora", "classification", "lora", LoRAConfig(rank=4, target_modules=["all-linear"]), ["x", "y"]
    )
    bank.add_task(
        "dora2",
        "classification",
        "lora",
        LoRAConfig(rank=3, target_modules=["all-linear"], rslora=True, use_dora=True),
        ["x", "y", "z"],
    )
    bank.add_task("ia3", "classification", "ia3", None, ["p", "q"])  # no LoRA: its rows pass LoRA's layers
    for i, task in enumerate(bank.tasks):
        _randomize(bank, task, seed=i + 5)
    ids, mask = _batch(base, 5)
    rows = torch.tensor([2, 0, 1, 3, 0])
    bank.eval()
    with torch.no_grad():
        mixed = bank.classify(ids, mask, rows)
        for r, slot in enumerate(rows.tolist()):
            alone = bank.classify(ids[r : r + 1], mask[r : r + 1], torch.tensor([slot]))
            torch.testing.assert_close(mixed[r : r + 1, : alone.shape[1]], alone, atol=1e-5, rtol=0)


def test_mixed_training_forward_equals_each_row_alone_and_gives_each_task_its_own_gradient() -> None:
    """While training (dropout 0), the stack is rebuilt with a graph to m: each row alone, and gradients that
    equal the sum of each task's own."""
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    for name, dora in (("a", True), ("b", False), ("c", True)):
        bank.add_task(
            name, "classification", "lora", LoRAConfig(rank=2, dropout=0.0, use_dora=dora), ["x", "y"]
        )
        _randomize(bank, name, seed=ord(name))
    bank.train()
    for module in base.model.modules():  # the base's own dropout off: forwards must be comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = _batch(base, 4)
    rows = torch.tensor([0, 1, 2, 0])
    bank.classify(ids, mask, rows).sum().backward()
    mixed = {
        (t, k): p.grad.clone() for t in "ac" for k, p in bank.task_parameters(t).items() if "magnitude" in k
    }
    assert all(g.abs().max() > 0 for g in mixed.values())
    bank.zero_grad()
    for r, slot in enumerate(rows.tolist()):
        bank.classify(ids[r : r + 1], mask[r : r + 1], torch.tensor([slot])).sum().backward()
    for t in "ac":
        for key, param in bank.task_parameters(t).items():
            if "magnitude" in key:
                torch.testing.assert_close(mixed[t, key], param.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_gives_identical_outputs_and_unmerge_restores_the_base(family: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task(
        "t",
        "classification",
        "lora",
        LoRAConfig(rank=4, target_modules=["all-linear"], use_dora=True),
        ["a", "b"],
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
        with bank.disabled():  # the merged base alone gives the task's answer
            merged_base = bank.classify(ids, mask, rows)
        changed = any(
            (v - original[k]).abs().max() > 1e-3 for k, v in base.model.state_dict().items() if k in original
        )
        bank.unmerge("t")
        after = bank.classify(ids, mask, rows)
    assert changed
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_base, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for key, value in base.model.state_dict().items():
        if key in original:
            torch.testing.assert_close(value, original[key], atol=1e-5, rtol=0)


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    from safetensors.torch import load_file

    bank, _ = _dora_bank("gpt2")
    bank.eval()
    ids, mask = _batch(bank.base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", 3)):
        want = bank.base.model(input_ids=ids, attention_mask=mask).logits
    save_adapter(bank, "t", tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == 4  # c_attn and c_fc of 2 blocks
    fresh = MultiTaskModel(tiny_base("gpt2"))
    spec = load_adapter(fresh, tmp_path / "adapter")
    assert spec.config["use_dora"] is True
    fresh.eval()
    with torch.no_grad(), fresh.routed(fresh.task_ids("t", 3)):
        got = fresh.base.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_peft_with_the_same_outputs(family: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from multitune.interop.peft import export_peft

    bank, _ = _dora_bank(family)
    bank.eval()
    export_peft(bank, "t", tmp_path / "peft")
    reference = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "peft").eval()
    assert reference.peft_config["default"].use_dora is True
    ids, mask = _batch(bank.base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", 3)):
        got = _outputs(bank.base.model, bank.base.arch, ids, mask)
    with torch.no_grad():
        want = _outputs(reference, bank.base.arch, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_a_dora_adapter_saved_by_peft_imports_with_the_same_outputs(family: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from multitune.interop.peft import import_peft

    torch.manual_seed(0)
    reference = peft.get_peft_model(
        tiny_model(family),
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            lora_dropout=0.0,
            target_modules=PEFT_TARGETS[family],
            use_dora=True,
            fan_in_fan_out=family == "gpt2",
        ),
    )
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
            if "lora_magnitude_vector" in name:
                param.mul_(1.5)
    reference.save_pretrained(tmp_path / "peft")
    bank = MultiTaskModel(tiny_base(family))
    spec = import_peft(bank, tmp_path / "peft", "t", kind="generation")
    assert spec.config["use_dora"] is True
    bank.eval()
    reference.eval()
    ids, mask = _batch(bank.base)
    with torch.no_grad(), bank.routed(bank.task_ids("t", 3)):
        got = _outputs(bank.base.model, bank.base.arch, ids, mask)
    with torch.no_grad():
        want = _outputs(reference, bank.base.arch, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_training_lowers_the_loss_and_moves_the_magnitudes() -> None:
    base = tiny_base("bert")
    bank = MultiTaskModel(base)
    bank.add_task(
        "t", "classification", "lora", LoRAConfig(rank=4, dropout=0.1, use_dora=True), ["pos", "neg"]
    )
    examples = toy_sentiment(32)
    enc = base.tokenizer([e.text for e in examples], padding=True, return_tensors="pt")
    labels = torch.tensor([0 if e.label == "pos" else 1 for e in examples])
    rows = bank.task_ids("t", len(examples))
    params = bank.task_parameters("t")
    start = {k: p.detach().clone() for k, p in params.items() if "magnitude" in k}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    bank.train()
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(bank.classify(enc.input_ids, enc.attention_mask, rows), labels)
        optimizer.zero_grad()
        loss.backward()
        assert all(params[k].grad is not None and params[k].grad.abs().max() > 0 for k in start)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all((params[k] - start[k]).abs().max() > 1e-3 for k in start)


def test_dora_over_a_base_whose_weights_are_not_floating_point_is_refused() -> None:
    base = tiny_base("llama")
    layer = base.model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(
        layer.weight.detach().to(torch.int8), requires_grad=False
    )  # as a quantized base
    bank = MultiTaskModel(base)
    with pytest.raises(ConfigError, match=r"DoRA takes the norm.*torch.int8.*--lora-use-dora"):
        bank.add_task("t", "generation", "lora", LoRAConfig(use_dora=True))
    assert "t" not in bank.tasks and not any(isinstance(m, LoRALinear) for m in bank.modules())


def test_the_flag_sets_use_dora() -> None:
    from multitune.cli import build_parser
    from multitune.flags import load_run_config, parse_args

    args = parse_args(build_parser(), ["train", "--lora-use-dora"])
    assert load_run_config(args).methods["lora"].use_dora is True
    args = parse_args(build_parser(), ["train"])
    assert load_run_config(args).methods["lora"].use_dora is False
