"""(IA)^3: defaults and parity with the peft package, learning, merge/unmerge, mixed-batch routing next to
LoRA (in either chain order), gradients, storage, configuration errors and removal."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, tiny_base, tiny_model, toy_generation, toy_sentiment, word_tokenizer

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods import get_method
from multitune.methods.ia3 import IA3Config, IA3Linear, ia3_layers
from multitune.methods.lora import LoRAConfig, LoRALinear
from multitune.methods.wrap import TaskLinear
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate
from multitune.training.train import train

TEXTS = [
    "good movie",
    "the film was very bad and not nice",
    "what",
    "so happy",
    "this is not quite fine",
    "bad",
]
# A second (IA)^3 target set per family; its feed-forward layer is one the defaults scale at the output.
OTHER = {
    "llama": IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["v_proj"]),
    "gpt2": IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_attn"]),
    "bert": IA3Config(target_modules=["value", "intermediate.dense"], feedforward_modules=["value"]),
    "t5": IA3Config(target_modules=["v", "wi"], feedforward_modules=["v"]),
}
# LoRA on layers no (IA)^3 task above touches.
ELSEWHERE = {"llama": ["gate_proj"], "gpt2": ["attn.c_proj"], "bert": ["query"], "t5": ["o"]}


def _kind(family: str) -> tuple[str, list[str] | None]:
    return ("classification", ["neg", "pos"]) if family == "bert" else ("generation", None)


def _randomize(bank: MultiTaskModel, task: str, seed: int) -> None:
    """Vectors near one (they start at exactly one, which would make every test trivial); others random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in bank.task_parameters(task).items():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if key.endswith(".ia3_l") else 0.2 * noise)


def _batch(base, n: int = 3):
    enc = base.tokenizer(TEXTS[:n], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _outputs(model, arch: str, ids, mask):
    if arch == "seq2seq":
        decoder = torch.zeros((ids.shape[0], 2), dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _routed_outputs(bank: MultiTaskModel, task: str, ids, mask):
    with torch.no_grad(), bank.routed(bank.task_ids(task, ids.shape[0])):
        return _outputs(bank.base.model, bank.base.arch, ids, mask)


def _layers(bank: MultiTaskModel, task: str) -> dict[str, bool]:
    """Layer name -> feed-forward, for every layer where ``task`` has a vector."""
    return {name: layer.feedforward[task] for name, layer in ia3_layers(bank, task)}


# ---- defaults and parity with the peft package -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_default_layers_are_pefts(family: str) -> None:
    peft = pytest.importorskip("peft")
    bank = MultiTaskModel(tiny_base(family))
    kind, labels = _kind(family)
    bank.add_task("t", kind, "ia3", labels=labels)
    reference = peft.get_peft_model(tiny_model(family), peft.IA3Config())
    want = {
        name.removeprefix("base_model.model."): module.is_feedforward
        for name, module in reference.named_modules()
        if hasattr(module, "ia3_l") and "default" in module.ia3_l
    }
    assert _layers(bank, "t") == want
    assert any(want.values()) and not all(want.values())


def test_distilbert_defaults_follow_berts_choice() -> None:
    import transformers as t

    from multitune.models import base_from_model

    config = t.DistilBertConfig(
        vocab_size=45, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    torch.manual_seed(0)
    bank = MultiTaskModel(base_from_model(t.DistilBertModel(config), word_tokenizer(), "tiny-distilbert"))
    bank.add_task("t", "classification", "ia3", labels=["a", "b"])
    layers = _layers(bank, "t")
    assert sorted({n.split(".", 3)[-1] for n in layers}) == ["attention.k_lin", "attention.v_lin", "ffn.lin2"]
    assert [n for n, ff in layers.items() if ff] == [
        "transformer.layer.0.ffn.lin2",
        "transformer.layer.1.ffn.lin2",
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", ["default", "other"])
def test_export_loads_in_peft_with_the_same_outputs(family: str, config: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from multitune.interop.peft import export_peft

    base = tiny_base(family)
    bank = MultiTaskModel(base)
    kind, labels = _kind(family)
    bank.add_task("t", kind, "ia3", OTHER[family] if config == "other" else None, labels)
    _randomize(bank, "t", seed=3)
    export_peft(bank, "t", tmp_path / "peft")
    reference = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "peft")
    reference.eval()
    ids, mask = _batch(base)
    got = _routed_outputs(bank, "t", ids, mask)
    with torch.no_grad():
        want = _outputs(reference, base.arch, ids, mask)
        plain = _outputs(tiny_model(family), base.arch, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the vectors really change the output


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_save_pretrained_imports_with_the_same_outputs(family: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from multitune.interop.peft import import_peft

    reference = peft.get_peft_model(tiny_model(family), peft.IA3Config())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
    reference.save_pretrained(tmp_path / "peft")
    reference.eval()

    base = tiny_base(family)
    bank = MultiTaskModel(base)
    kind, labels = _kind(family)
    import_peft(bank, tmp_path / "peft", "t", kind, labels)
    ids, mask = _batch(base)
    with torch.no_grad():
        want = _outputs(reference, base.arch, ids, mask)
    torch.testing.assert_close(_routed_outputs(bank, "t", ids, mask), want, atol=1e-5, rtol=0)
    assert bank.tasks["t"].config["feedforward_modules"] is not None


def test_export_writes_full_paths_when_peft_would_match_other_layers(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    import json

    from multitune.interop.peft import export_peft, import_peft

    base = tiny_base("gpt2")
    bank = MultiTaskModel(base)
    # PEFT's feed-forward test is name.endswith("c_proj"): it would also catch attn.c_proj.
    bank.add_task(
        "t", "generation", "ia3", IA3Config(target_modules=["c_proj"], feedforward_modules=["mlp.c_proj"])
    )
    _randomize(bank, "t", seed=2)
    export_peft(bank, "t", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert config["fan_in_fan_out"] is True
    reference = peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "peft")
    ids, mask = _batch(base)
    with torch.no_grad():
        want = _outputs(reference.eval(), "decoder", ids, mask)
    torch.testing.assert_close(_routed_outputs(bank, "t", ids, mask), want, atol=1e-5, rtol=0)
    import_peft(bank, tmp_path / "peft", "back", "generation")
    assert _layers(bank, "back") == _layers(bank, "t")


# ---- learning and parameters -------------------------------------------------------------------------
def test_trainable_parameters_are_exactly_the_vectors_and_the_head() -> None:
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("t", "classification", "ia3", labels=["a", "b"])
    own = bank.task_parameters("t")
    trainable = {id(p) for p in bank.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in own.values()}
    # per layer: key (32, 1), value (32, 1), attention.output.dense (1, 32), output.dense (1, 64); 2 layers
    shapes = {k.split(".", 3)[-1]: tuple(p.shape) for k, p in own.items() if k.startswith("encoder.layer.0.")}
    assert shapes == {
        "attention.self.key.ia3_l": (32, 1),
        "attention.self.value.ia3_l": (32, 1),
        "attention.output.dense.ia3_l": (1, 32),
        "output.dense.ia3_l": (1, 64),
    }
    assert sum(p.numel() for p in own.values()) == 2 * (32 + 32 + 32 + 64) + 32 * 2 + 2
    assert all(torch.equal(p, torch.ones_like(p)) for k, p in own.items() if k.endswith(".ia3_l"))
    assert get_method("ia3").default_learning_rate == pytest.approx(3e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_learns_the_toy_classification_task(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("t", "classification", "ia3", labels=["neg", "pos"])
    data = toy_sentiment(64)
    before = evaluate(bank, "t", data)["loss"]
    cfg = TrainConfig(epochs=4, batch_size=8, learning_rate=3e-2, warmup_ratio=0.0, patience=100)
    train(bank, "t", data, data[:16], cfg, progress=False)
    assert evaluate(bank, "t", data)["loss"] < 0.85 * before
    assert any(
        not torch.equal(p, torch.ones_like(p))
        for k, p in bank.task_parameters("t").items()
        if k.endswith(".ia3_l")
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_ia3_learns_generation(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("g", "generation", "ia3")
    data = toy_generation(32)
    before = evaluate(bank, "g", data, generate=False)["loss"]
    cfg = TrainConfig(epochs=5, batch_size=8, learning_rate=5e-2, warmup_ratio=0.0, patience=100)
    train(bank, "g", data, data[:8], cfg, progress=False)
    assert evaluate(bank, "g", data, generate=False)["loss"] < 0.8 * before


# ---- merge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", ["default", "other"])
def test_merge_gives_identical_outputs_and_unmerge_restores_the_base(family: str, config: str) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("t", "classification", "ia3", OTHER[family] if config == "other" else None, ["a", "b"])
    _randomize(bank, "t", seed=1)
    with torch.no_grad():
        next(iter(bank.task_parameters("t").values()))[0, 0] = 0.0  # cannot be divided back out
        for name, param in base.model.named_parameters():
            if name.endswith(".bias"):  # random models start with zero biases: scaling them would go unseen
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    ids, mask = _batch(base)
    rows = bank.task_ids("t", ids.shape[0])
    original = {k: v.clone() for k, v in base.model.state_dict().items() if "ia3_l" not in k}
    with torch.no_grad():
        before = bank.classify(ids, mask, rows)
        bank.merge("t")
        changed = [
            k for k, v in base.model.state_dict().items() if k in original and not torch.equal(v, original[k])
        ]
        merged = bank.classify(ids, mask, rows)
        with bank.disabled():
            merged_base = bank.classify(ids, mask, rows)
        bank.unmerge("t")
        after = bank.classify(ids, mask, rows)
    assert len(changed) >= len(_layers(bank, "t"))
    if family == "gpt2" or family == "bert":  # layers with a bias: output scaling folds into it too
        assert any(k.endswith(".bias") for k in changed)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_base, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for key, value in base.model.state_dict().items():
        if key in original:
            torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


# ---- mixed batches ---------------------------------------------------------------------------------------
def _mixed_bank(family: str, lora_first: bool) -> MultiTaskModel:
    """Two (IA)^3 tasks with different targets, LoRA on overlapping layers, LoRA on other layers only."""
    bank = MultiTaskModel(tiny_base(family))
    adds = {
        "a": lambda: bank.add_task("a", "classification", "ia3", None, ["x", "y"]),
        "b": lambda: bank.add_task("b", "classification", "ia3", OTHER[family], ["x", "y", "z"]),
        "c": lambda: bank.add_task(
            "c",
            "classification",
            "lora",
            LoRAConfig(rank=3, dropout=0.0, target_modules=["all-linear"]),
            ["p", "q"],
        ),
        "d": lambda: bank.add_task(
            "d",
            "classification",
            "lora",
            LoRAConfig(rank=2, dropout=0.0, target_modules=ELSEWHERE[family]),
            ["u", "v"],
        ),
    }
    for task in ("c", "d", "a", "b") if lora_first else ("a", "b", "c", "d"):
        adds[task]()
    for i, task in enumerate("abcd"):
        _randomize(bank, task, seed=10 + i)
    return bank


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_rows_equal_each_row_alone_in_either_chain_order(family: str) -> None:
    order = ["a", "b", "c", "d", "b", "a"]
    results = []
    for lora_first in (False, True):
        bank = _mixed_bank(family, lora_first)
        chains = {type(m.base_layer).__name__ for m in bank.base.model.modules() if isinstance(m, TaskLinear)}
        assert ("LoRALinear" if lora_first else "IA3Linear") in chains  # inner wrapper: the first added
        ids, mask = _batch(bank.base, len(order))
        rows = torch.tensor([bank.slots.index(t) for t in order])
        with torch.no_grad():
            mixed = bank.classify(ids, mask, rows)
            mixed_again = bank.classify(ids, mask, rows)  # from the cached stacks
            for r in range(len(order)):
                alone = bank.classify(ids[r : r + 1], mask[r : r + 1], rows[r : r + 1])
                n = alone.shape[1]
                torch.testing.assert_close(mixed[r : r + 1, :n], alone, atol=1e-5, rtol=0)
                assert torch.isinf(mixed[r, n:]).all()
        torch.testing.assert_close(mixed_again, mixed, atol=0, rtol=0)
        results.append(mixed)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_gradient_of_a_task_from_a_mixed_batch_equals_its_rows_alone(family: str) -> None:
    bank = _mixed_bank(family, lora_first=False)
    order = ["a", "c", "b", "a", "d", "b"]
    ids, mask = _batch(bank.base, len(order))
    rows = torch.tensor([bank.slots.index(t) for t in order])
    weights = torch.randn(len(order), 3, generator=torch.Generator().manual_seed(0))

    def grads(select: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        bank.zero_grad(set_to_none=True)
        logits = bank.classify(ids[select], mask[select], rows[select])
        finite = torch.where(torch.isinf(logits), torch.zeros_like(logits), logits)
        (finite * weights[select, : logits.shape[1]]).sum().backward()
        return {
            t: {
                k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for k, p in bank.task_parameters(t).items()
                if k.endswith(".ia3_l")
            }
            for t in "ab"
        }

    mixed = grads(list(range(len(order))))
    for task in "ab":
        alone = grads([i for i, t in enumerate(order) if t == task])
        assert any(g.abs().max() > 0 for g in alone[task].values())
        for key, grad in alone[task].items():
            torch.testing.assert_close(mixed[task][key], grad, atol=1e-5, rtol=0)


def test_cached_stack_sees_vectors_changed_in_place() -> None:
    bank = _mixed_bank("bert", lora_first=False)
    ids, mask = _batch(bank.base, 4)
    rows = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        first = bank.classify(ids, mask, rows)
        for key, param in bank.task_parameters("a").items():
            if key.endswith(".ia3_l"):
                param.mul_(1.5)
        second = bank.classify(ids, mask, rows)
        alone = bank.classify(ids[:1], mask[:1], rows[:1])
    assert (second[0, :2] - first[0, :2]).abs().max() > 1e-4
    torch.testing.assert_close(second[:1, :2], alone, atol=1e-5, rtol=0)


# ---- storage, configuration errors, removal -------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_save_and_load_round_trip_gives_identical_outputs(family: str, tmp_path) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("t", "classification", "ia3", OTHER[family], ["a", "b", "c"])
    _randomize(bank, "t", seed=4)
    ids, mask = _batch(base)
    with torch.no_grad():
        want = bank.classify(ids, mask, bank.task_ids("t", 3))
    save_adapter(bank, "t", tmp_path / "adapter")
    fresh = MultiTaskModel(tiny_base(family))
    spec = load_adapter(fresh, tmp_path / "adapter")
    assert spec.method == "ia3" and spec.labels == ["a", "b", "c"]
    assert _layers(fresh, "t") == _layers(bank, "t")
    with torch.no_grad():
        got = fresh.classify(ids, mask, fresh.task_ids("t", 3))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (IA3Config(target_modules=["qkv"]), r"target modules qkv not found.*k_proj.*--ia3-target-modules"),
        (
            IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]),
            r"feed-forward modules down_proj are not among the targeted layers; --ia3-feedforward-modules",
        ),
        (IA3Config(target_modules=[]), r"empty; pass --ia3-target-modules"),
    ],
)
def test_bad_configs_are_refused_with_the_flag(config: IA3Config, expected: str) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match=expected):
        bank.add_task("t", "generation", "ia3", config)
    assert "t" not in bank.tasks
    assert not any(isinstance(m, TaskLinear) for m in bank.modules())


def test_a_family_without_defaults_needs_target_modules() -> None:
    from multitune.models import Family

    base = tiny_base("llama")
    base.family = Family("mystery", "decoder", (), ())
    base.model.config.model_type = "mystery"
    bank = MultiTaskModel(base)
    with pytest.raises(ConfigError, match=r"no default \(IA\)\^3 targets.*--ia3-target-modules.*down_proj"):
        bank.add_task("t", "generation", "ia3")
    bank.add_task(
        "t", "generation", "ia3", IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"])
    )
    assert list(_layers(bank, "t").values()) == [True, True]


def test_removing_tasks_restores_plain_layers_and_keeps_the_others() -> None:
    base = tiny_base("llama")
    plain_types = {n: type(m) for n, m in base.model.named_modules()}
    bank = _mixed_bank("llama", lora_first=False)
    base = bank.base
    ids, mask = _batch(base)
    with torch.no_grad():
        plain = _outputs(tiny_model("llama"), "decoder", ids, mask)
        before_c = _routed_outputs(bank, "c", ids, mask)
        before_b = _routed_outputs(bank, "b", ids, mask)
    bank.remove_task("a")
    assert not any("a" in m.ia3_l for m in base.model.modules() if isinstance(m, IA3Linear))
    assert not any(isinstance(m, IA3Linear) for n, m in base.model.named_modules() if n.endswith("k_proj"))
    torch.testing.assert_close(_routed_outputs(bank, "b", ids, mask), before_b, atol=0, rtol=0)
    bank.remove_task("b")
    assert not any(isinstance(m, IA3Linear) for m in base.model.modules())
    assert any(isinstance(m, LoRALinear) for m in base.model.modules())
    torch.testing.assert_close(_routed_outputs(bank, "c", ids, mask), before_c, atol=0, rtol=0)
    bank.remove_task("c")
    bank.remove_task("d")
    assert {n: type(m) for n, m in base.model.named_modules()} == plain_types
    with torch.no_grad():
        torch.testing.assert_close(_outputs(base.model, "decoder", ids, mask), plain, atol=0, rtol=0)
