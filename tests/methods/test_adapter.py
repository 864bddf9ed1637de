"""Bottleneck adapters: learning, parameter counts, exact start, placements, mixed batches with LoRA,
gradient isolation, per-task layer norms, storage, bad configs, removal."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from helpers import FAMILIES, tiny_base, tiny_model, toy_generation, toy_sentiment, word_tokenizer

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.flags import add_run_arguments, load_run_config
from multitune.methods.adapter import ACTIVATIONS, AdapterConfig, AdapterLinear, TaskNorm
from multitune.methods.lora import LoRAConfig, LoRALinear
from multitune.models import Family, base_from_model
from multitune.storage import load_adapter, save_adapter
from multitune.training.evaluate import evaluate
from multitune.training.train import train

TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy", "bad food and poor service"]
D = 32  # hidden size of the tiny models

# Adapter sites of the tiny models (2 blocks each), by placement.
ATTENTION = {
    "llama": [f"model.layers.{i}.self_attn.o_proj" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.attn.c_proj" for i in range(2)],
    "bert": [f"encoder.layer.{i}.attention.output.dense" for i in range(2)],
    "distilbert": [f"transformer.layer.{i}.attention.out_lin" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.0.SelfAttention.o" for i in range(2)]
    + [
        f"decoder.block.{i}.layer.{j}.{n}.o"
        for i in range(2)
        for j, n in ((0, "SelfAttention"), (1, "EncDecAttention"))
    ],
}
FFN = {
    "llama": [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
    "gpt2": [f"transformer.h.{i}.mlp.c_proj" for i in range(2)],
    "bert": [f"encoder.layer.{i}.output.dense" for i in range(2)],
    "distilbert": [f"transformer.layer.{i}.ffn.lin2" for i in range(2)],
    "t5": [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)]
    + [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in range(2)],
}
NORM_SIZE = {
    "llama": D,
    "gpt2": 2 * D,
    "bert": 2 * D,
    "distilbert": 2 * D,
    "t5": D,
}  # RMS: weight; LayerNorm: +bias
LORA_ON_ADAPTER_LAYERS = {
    "llama": ["o_proj", "down_proj"],
    "gpt2": ["c_proj"],
    "bert": ["output.dense"],
    "t5": ["o", "wo"],
}


def _base(family: str):
    if family != "distilbert":
        return tiny_base(family)
    import transformers as t

    torch.manual_seed(0)
    config = t.DistilBertConfig(
        vocab_size=42,
        dim=D,
        hidden_dim=64,
        n_layers=2,
        n_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return base_from_model(t.DistilBertModel(config), word_tokenizer(), source="tiny-distilbert")


def _randomize(bank: MultiTaskModel, task: str, seed: int) -> None:
    """Non-zero adapter weights (U starts at zero) and norm copies that differ from the base's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in bank.task_parameters(task).items():
            noise = torch.randn(param.shape, generator=generator) * 0.3
            param.copy_(1.0 + noise if key.endswith("ln.weight") else noise)


def _kind(family: str) -> str:
    return "classification" if family == "bert" else "generation"


def _encode(base, n: int = len(TEXTS), left: bool = False):
    enc = base.tokenizer(
        TEXTS[:n], padding=True, return_tensors="pt", padding_side="left" if left else "right"
    )
    return enc.input_ids, enc.attention_mask


def _logits(bank: MultiTaskModel, ids, mask, rows):
    """The model's output for routed rows: LM logits (decoders, T5 with a 2-step decoder input) or BERT's states."""
    model = bank.base.model
    with bank.routed(rows):
        if bank.base.arch == "seq2seq":
            decoder = torch.zeros((ids.shape[0], 2), dtype=torch.long)
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        out = model(input_ids=ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _wrapped(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLinear))


# ---- learning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_learns_the_toy_classification_task(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("c", "classification", "adapter", AdapterConfig(reduction_factor=4), ["neg", "pos"])
    data = toy_sentiment(64)
    before = evaluate(bank, "c", data)["loss"]
    cfg = TrainConfig(epochs=8, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    train(bank, "c", data, data[:16], cfg, progress=False)
    assert evaluate(bank, "c", data)["loss"] < 0.85 * before
    ups = [p for k, p in bank.task_parameters("c").items() if k.endswith("adapter_up.weight")]
    assert all(p.abs().max() > 0 for p in ups)  # the adapters trained, not only the head


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_adapter_learns_generation(family: str) -> None:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("g", "generation", "adapter", AdapterConfig(reduction_factor=4))
    data = toy_generation(32)
    before = evaluate(bank, "g", data, generate=False)["loss"]
    cfg = TrainConfig(epochs=10, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    train(bank, "g", data, data[:8], cfg, progress=False)
    assert evaluate(bank, "g", data, generate=False)["loss"] < 0.8 * before  # no head: the adapters alone


# ---- parameters, start, placement ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("norms", [False, True])
def test_trainable_parameters_are_exactly_the_adapter_tensors(
    family: str, placement: str, norms: bool
) -> None:
    bank = MultiTaskModel(tiny_base(family))
    config = AdapterConfig(reduction_factor=8, placement=placement, train_layer_norms=norms)
    bank.add_task("t", "classification", "adapter", config, ["a", "b"])
    own = bank.task_parameters("t")
    assert {id(p) for p in bank.parameters() if p.requires_grad} == {id(p) for p in own.values()}
    sites = ATTENTION[family] + FFN[family] if placement == "houlsby" else FFN[family]
    r = D // 8
    per_site = 2 * r * D + r + D  # D (r, d) + b_D (r) + U (d, r) + b_U (d)
    expected = len(sites) * (per_site + (NORM_SIZE[family] if norms else 0)) + D * 2 + 2
    assert sum(p.numel() for p in own.values()) == expected
    adapter_keys = {k for k in own if ".adapter_" in k}
    assert adapter_keys == {
        f"{s}.adapter_{m}.{w}" for s in sites for m in ("down", "up") for w in ("weight", "bias")
    }
    assert len([k for k in own if k.endswith(".ln.weight")]) == (len(sites) if norms else 0)


def test_bottleneck_is_at_least_one() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("t", "generation", "adapter", AdapterConfig(reduction_factor=1000))
    assert bank.task_parameters("t")["model.layers.0.mlp.down_proj.adapter_down.weight"].shape == (1, D)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_adapter_starts_exactly_at_the_base(family: str) -> None:
    """U = 0 and norm copies equal to the base: the outputs are equal to the bit (tolerance 0)."""
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task(
        "t",
        _kind(family),
        "adapter",
        AdapterConfig(reduction_factor=4, train_layer_norms=True),
        labels=["a", "b"] if family == "bert" else None,
    )
    ids, mask = _encode(base)
    with torch.no_grad():
        got = _logits(bank, ids, mask, bank.task_ids("t", ids.shape[0]))
        with bank.disabled():
            want = _logits(bank, ids, mask, bank.task_ids("t", ids.shape[0]))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    down = [p for k, p in bank.task_parameters("t").items() if k.endswith("adapter_down.weight")]
    assert all(0 < p.abs().max() <= 2e-2 for p in down)  # Houlsby 3.6: N(0, 1e-2) truncated at 2 std


def test_gradient_reaches_both_matrices_after_the_first_step() -> None:
    """Step 1: U gets gradient, D none (it passes through U = 0). After one update D gets gradient too."""
    torch.manual_seed(0)
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    bank.add_task("t", "generation", "adapter", AdapterConfig(reduction_factor=4))
    own = bank.task_parameters("t")
    ids, mask = _encode(base)
    rows = bank.task_ids("t", ids.shape[0])

    def step_grads() -> dict[str, torch.Tensor]:
        loss = _logits(bank, ids, mask, rows).logsumexp(-1).sum()
        return dict(zip(own, torch.autograd.grad(loss, list(own.values())), strict=True))

    first = step_grads()
    for key, grad in first.items():
        if ".adapter_down." in key:
            assert grad.abs().max() == 0, key
        else:
            assert grad.abs().max() > 0, key
    with torch.no_grad():
        for key, param in own.items():
            param -= 0.1 * first[key]
    second = step_grads()
    assert all(grad.abs().max() > 0 for grad in second.values())


def test_every_allowed_activation_maps_zero_to_zero() -> None:
    zero = torch.zeros(3)
    for name, act in ACTIVATIONS.items():
        assert torch.equal(act(zero), zero), name


@pytest.mark.parametrize("family", [*FAMILIES, "distilbert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_placements_wrap_the_expected_layers(family: str, placement: str) -> None:
    base = _base(family)
    bank = MultiTaskModel(base)
    bank.add_task(
        "t",
        "classification",
        "adapter",
        AdapterConfig(placement=placement, train_layer_norms=True),
        ["a", "b"],
    )
    expected = (ATTENTION[family] if placement == "houlsby" else []) + FFN[family]
    assert _wrapped(base.model) == sorted(expected)
    assert len([m for m in base.model.modules() if isinstance(m, TaskNorm)]) == len(expected)


# ---- routing ---------------------------------------------------------------------------------------------
def _mixed_bank(family: str, lora_first: bool) -> MultiTaskModel:
    """Two adapter tasks (r 8 houlsby gelu + norms; r 4 pfeiffer relu), LoRA on the same layers, LoRA elsewhere."""
    bank = MultiTaskModel(tiny_base(family))
    labels = ["x", "y"]
    lora_same = (
        "l",
        "classification",
        "lora",
        LoRAConfig(rank=3, dropout=0.0, target_modules=LORA_ON_ADAPTER_LAYERS[family]),
        labels,
    )
    if lora_first:
        bank.add_task(*lora_same)
    bank.add_task(
        "a",
        "classification",
        "adapter",
        AdapterConfig(reduction_factor=4, activation="gelu", train_layer_norms=True),
        labels,
    )
    bank.add_task(
        "b", "classification", "adapter", AdapterConfig(reduction_factor=8, placement="pfeiffer"), labels
    )
    if not lora_first:
        bank.add_task(*lora_same)
    bank.add_task(
        "n", "classification", "lora", LoRAConfig(rank=2, dropout=0.0), labels
    )  # no adapter anywhere
    for i, task in enumerate(bank.slots):
        _randomize(bank, task, seed=i + 3)
    return bank


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora_first", [True, False])
def test_mixed_batch_rows_equal_each_row_alone(family: str, lora_first: bool) -> None:
    bank = _mixed_bank(family, lora_first)
    inner = "LoRALinear" if lora_first else "AdapterLinear"  # the chain really holds both, in this order
    site = FFN[family][0]
    assert type(bank.base.model.get_submodule(site + ".base_layer")).__name__ == inner
    slot = {t: i for i, t in enumerate(bank.slots)}
    rows = torch.tensor([slot["a"], slot["b"], slot["l"], slot["n"], slot["a"]])
    ids, mask = _encode(bank.base, left=bank.base.arch == "decoder")
    with torch.no_grad():
        mixed = bank.classify(ids, mask, rows)
        logits = _logits(bank, ids, mask, rows)
        for r, s in enumerate(rows.tolist()):
            one = torch.tensor([s])
            torch.testing.assert_close(
                mixed[r : r + 1], bank.classify(ids[r : r + 1], mask[r : r + 1], one), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                logits[r : r + 1], _logits(bank, ids[r : r + 1], mask[r : r + 1], one), atol=1e-5, rtol=0
            )
        with bank.disabled():
            plain = _logits(bank, ids, mask, rows)
        assert all((logits[r] - plain[r]).abs().max() > 1e-3 for r in (0, 1, 4))  # the adapters matter
        # the stacks are cached between no-grad forwards: a second pass gives the same
        torch.testing.assert_close(bank.classify(ids, mask, rows), mixed, atol=0, rtol=0)
    if family != "bert":  # generation with the KV cache: one position per step, rows still routed
        for task in ("a", "b"):
            bank.tasks[task].kind = "generation"
        gen_rows = torch.tensor([slot["a"], slot["b"], slot["n"]])
        gen_ids, gen_mask = _encode(bank.base, 3, left=bank.base.arch == "decoder")
        got = bank.generate(gen_ids, gen_mask, gen_rows, max_new_tokens=4, do_sample=False)
        for r, s in enumerate(gen_rows.tolist()):
            alone = bank.generate(
                gen_ids[r : r + 1], gen_mask[r : r + 1], torch.tensor([s]), max_new_tokens=4, do_sample=False
            )
            assert torch.equal(got[r, : alone.shape[1]], alone[0])


def test_mixed_stack_cache_sees_in_place_updates() -> None:
    """A no-grad forward after the weights changed in place (an optimizer step, a load) uses the new weights."""
    bank = _mixed_bank("llama", lora_first=False)
    slot = {t: i for i, t in enumerate(bank.slots)}
    rows = torch.tensor([slot["a"], slot["b"], slot["a"]])
    ids, mask = _encode(bank.base, 3)
    with torch.no_grad():
        first = bank.classify(ids, mask, rows)
        for key, param in bank.task_parameters("a").items():
            if key.endswith(("adapter_up.weight", "ln.weight")):
                param.mul_(2.0)
        second = bank.classify(ids, mask, rows)
        alone = bank.classify(ids[:1], mask[:1], torch.tensor([slot["a"]]))
    assert (second - first).abs().max() > 1e-3
    torch.testing.assert_close(second[:1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_of_a_task_from_a_mixed_batch_equals_its_rows_alone(family: str) -> None:
    bank = _mixed_bank(family, lora_first=True)
    slot = {t: i for i, t in enumerate(bank.slots)}
    rows = torch.tensor([slot["a"], slot["b"], slot["l"], slot["a"], slot["b"]])
    ids, mask = _encode(bank.base)
    every = [p for t in bank.slots for p in bank.task_parameters(t).values()]
    mixed = torch.autograd.grad(bank.classify(ids, mask, rows).pow(2).sum(), every, allow_unused=True)
    mixed_by_param = {id(p): g for p, g in zip(every, mixed, strict=True)}
    for task in ("a", "b", "l"):
        own = list(bank.task_parameters(task).values())
        picked = (rows == slot[task]).nonzero(as_tuple=True)[0]
        loss = bank.classify(ids[picked], mask[picked], rows[picked]).pow(2).sum()
        for param, want in zip(own, torch.autograd.grad(loss, own), strict=True):
            got = mixed_by_param[id(param)]
            assert got is not None and want.abs().max() > 0
            # the batch sums its rows' gradients in another order than each row alone: float32 rounding of
            # gradients near 10 is about 1e-6 of them (seen: 1.2e-5 at 11.6 on gpt2)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    n_grads = [mixed_by_param[id(p)] for p in bank.task_parameters("n").values()]
    assert all(g is None or g.abs().max() == 0 for g in n_grads)  # no row of 'n' in the batch


# ---- layer norms, storage, removal -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_trained_norms_leave_the_base_and_other_tasks_unchanged(family: str) -> None:
    torch.manual_seed(0)
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    bank.add_task("other", "classification", "adapter", AdapterConfig(reduction_factor=4), ["neg", "pos"])
    _randomize(bank, "other", seed=1)
    frozen = [(p, p.detach().clone()) for p in base.model.parameters()]
    ids, mask = _encode(base)
    other_rows = bank.task_ids("other", ids.shape[0])
    with torch.no_grad():
        other_before = bank.classify(ids, mask, other_rows)
        with bank.disabled():
            base_before = _logits(bank, ids, mask, other_rows)

    bank.add_task(
        "t",
        "classification",
        "adapter",
        AdapterConfig(reduction_factor=4, train_layer_norms=True),
        ["neg", "pos"],
    )
    data = toy_sentiment(32)
    train(
        bank,
        "t",
        data,
        data[:8],
        TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0),
        progress=False,
    )

    norms = {k: p for k, p in bank.task_parameters("t").items() if k.endswith(".ln.weight")}
    assert norms and all(
        (p - base.model.get_submodule(k.removesuffix(".ln.weight")).weight).abs().max() > 0
        for k, p in norms.items()
    )  # the copies trained
    for param, saved in frozen:
        torch.testing.assert_close(param, saved, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(bank.classify(ids, mask, other_rows), other_before, atol=0, rtol=0)
        with bank.disabled():
            torch.testing.assert_close(_logits(bank, ids, mask, other_rows), base_before, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_gives_identical_outputs(family: str, tmp_path) -> None:
    base = tiny_base(family)
    bank = MultiTaskModel(base)
    config = AdapterConfig(
        reduction_factor=4, placement="pfeiffer", activation="tanh", train_layer_norms=True
    )
    bank.add_task("t", "classification", "adapter", config, ["a", "b", "c"])
    _randomize(bank, "t", seed=2)
    ids, mask = _encode(base)
    with torch.no_grad():
        want = bank.classify(ids, mask, bank.task_ids("t", ids.shape[0]))
    save_adapter(bank, "t", tmp_path / "adapter")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter" / "adapter.safetensors"))) == set(bank.task_parameters("t"))
    fresh = MultiTaskModel(tiny_base(family))
    spec = load_adapter(fresh, tmp_path / "adapter")
    assert spec.config == dataclasses.asdict(config)
    with torch.no_grad():
        got = fresh.classify(ids, mask, fresh.task_ids("t", ids.shape[0]))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_remove_task_restores_the_plain_model() -> None:
    base = tiny_base("llama")
    bank = MultiTaskModel(base)
    bank.add_task("l", "generation", "lora", LoRAConfig(target_modules=["o_proj"]))
    bank.add_task("a", "generation", "adapter", AdapterConfig(reduction_factor=4, train_layer_norms=True))
    bank.add_task("b", "generation", "adapter", AdapterConfig(placement="pfeiffer", train_layer_norms=True))
    for i, task in enumerate(bank.slots):
        _randomize(bank, task, seed=i)
    ids, mask = _encode(base)
    with torch.no_grad():
        b_before = _logits(bank, ids, mask, bank.task_ids("b", ids.shape[0]))
    bank.remove_task("a")
    assert _wrapped(base.model) == FFN["llama"]
    assert sorted(n for n, m in base.model.named_modules() if isinstance(m, TaskNorm)) == [
        f"model.layers.{i}.post_attention_layernorm" for i in range(2)
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            _logits(bank, ids, mask, bank.task_ids("b", ids.shape[0])), b_before, atol=0, rtol=0
        )
    bank.remove_task("b")
    assert not any(isinstance(m, AdapterLinear | TaskNorm) for m in base.model.modules())
    assert isinstance(base.model.get_submodule("model.layers.0.self_attn.o_proj"), LoRALinear)
    bank.remove_task("l")
    plain = tiny_model("llama")
    assert [(n, type(m)) for n, m in base.model.named_modules()] == [
        (n, type(m)) for n, m in plain.named_modules()
    ]
    assert base.model.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(
            base.model(input_ids=ids, attention_mask=mask).logits,
            plain(input_ids=ids, attention_mask=mask).logits,
            atol=0,
            rtol=0,
        )


# ---- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "flag"),
    [
        (AdapterConfig(reduction_factor=0), "--adapter-reduction-factor"),
        (AdapterConfig(placement="middle"), "--adapter-placement"),
        (AdapterConfig(activation="swish"), "--adapter-activation"),
        (AdapterConfig(modules=[]), "--adapter-modules"),
        (AdapterConfig(modules=["nope"]), "--adapter-modules"),
        (AdapterConfig(modules=["q_proj"], train_layer_norms=True), "--adapter-train-layer-norms"),
    ],
)
def test_bad_adapter_configs_name_the_flag(config: AdapterConfig, flag: str) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match=flag):
        bank.add_task("t", "generation", "adapter", config)
    assert "t" not in bank.tasks
    assert not any(isinstance(m, AdapterLinear | TaskNorm) for m in bank.modules())


def test_a_family_outside_the_table_needs_modules() -> None:
    base = dataclasses.replace(tiny_base("llama"), family=Family("opt", "decoder", (), ()))
    bank = MultiTaskModel(base)
    with pytest.raises(ConfigError, match=r"--adapter-modules.*o_proj"):
        bank.add_task("t", "generation", "adapter")
    bank.add_task(
        "t", "generation", "adapter", AdapterConfig(modules=["o_proj", "up_proj"], placement="pfeiffer")
    )
    assert _wrapped(base.model) == sorted(
        [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.o_proj", "mlp.up_proj")]
    )


def test_adapter_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(
        [
            "--method",
            "adapter",
            "--adapter-reduction-factor",
            "8",
            "--adapter-placement",
            "pfeiffer",
            "--adapter-train-layer-norms",
            "--adapter-modules",
            "o_proj,down_proj",
        ]
    )
    assert load_run_config(args).methods["adapter"] == AdapterConfig(
        reduction_factor=8, placement="pfeiffer", train_layer_norms=True, modules=["o_proj", "down_proj"]
    )
    with pytest.raises(ConfigError, match="--adapter-activation"):
        load_run_config(parser.parse_args(["--method", "adapter", "--adapter-activation", "swish"]))
