"""multitune export --format gguf: a llama.cpp LoRA adapter, read back with the gguf package and run by llama.cpp."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from helpers import perturb, tiny_base

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.interop.gguf_lora import _permute, export_gguf
from multitune.methods.lora import LoRAConfig

gguf = pytest.importorskip("gguf")


def _bank(method: str = "lora", config=None, family: str = "llama") -> MultiTaskModel:
    bank = MultiTaskModel(tiny_base(family))
    torch.manual_seed(0)
    bank.add_task("t", "generation", method, config)
    perturb(bank, "t", seed=1)
    return bank


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_the_adapter_file_is_what_llama_cpp_s_converter_writes(tmp_path) -> None:
    config = LoRAConfig(rank=4, alpha=12.0, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    bank = _bank(config=config)
    path = export_gguf(bank, "t", tmp_path / "t.gguf")
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(12.0)
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    own = bank.task_state_dict("t")
    assert set(tensors) == {
        f"blk.{i}.{name}.weight.lora_{ab}" for i in range(2) for name in ("attn_q", "attn_k", "attn_v", "ffn_down")
        for ab in "ab"
    }  # fmt: skip
    a = own["model.layers.1.mlp.down_proj.lora_A.weight"]
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape == tuple(a.shape)  # (r, in): no transpose
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_a"], a.numpy())
    np.testing.assert_array_equal(
        tensors["blk.0.attn_v.weight.lora_b"], own["model.layers.0.self_attn.v_proj.lora_B.weight"].numpy()
    )
    # q and k rows in llama.cpp's order: transformers' GGUF reader, which undoes that order, gives ours back
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hf = bank.base.model.config
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, module in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        written = tensors[f"blk.0.{name}.weight.lora_b"]
        back = undo.process(written, f"blk.0.{name}.weight").weights
        np.testing.assert_array_equal(back, own[f"model.layers.0.self_attn.{module}.lora_B.weight"].numpy())
        assert not np.array_equal(written, back)  # the permutation moved rows
    assert hf.num_attention_heads == 4 and hf.num_key_value_heads == 2


def test_rslora_writes_the_alpha_that_gives_its_scale(tmp_path) -> None:
    bank = _bank(config=LoRAConfig(rank=4, alpha=8.0, rslora=True))
    fields = _fields(gguf.GGUFReader(export_gguf(bank, "t", tmp_path / "t.gguf")))
    assert fields["adapter.lora.alpha"] / 4 == pytest.approx(8.0 / 2.0)  # llama.cpp: alpha / r = 8 / sqrt(4)


def test_the_permutation_is_llama_cpp_s() -> None:
    rows = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    # llama.cpp: reshape(heads, 2, d/2, ...) then swap: the rows of each head's two halves interleave
    expected = rows.reshape(2, 2, 4, 3).swapaxes(1, 2).reshape(16, 3)
    torch.testing.assert_close(_permute(rows, 2), expected)
    assert _permute(rows, 2)[:4, 0].tolist() == [0.0, 12.0, 3.0, 15.0]


@pytest.mark.parametrize(
    ("method", "config", "family", "message"),
    [
        ("ia3", None, "llama", "llama.cpp's adapters are LoRA"),
        ("lora", LoRAConfig(rank=4, use_dora=True), "llama", "magnitude"),
        ("lora", None, "gpt2", "only the llama layout"),
        ("prompt", None, "llama", "llama.cpp's adapters are LoRA"),
    ],  # fmt: skip
)
def test_what_llama_cpp_cannot_hold_is_refused(method, config, family, message, tmp_path) -> None:
    bank = _bank(method, config, family)
    with pytest.raises(ConfigError, match=message):
        export_gguf(bank, "t", tmp_path / "t.gguf")
    assert list(tmp_path.iterdir()) == []


def _f32_copy(source: str, target: str) -> None:
    """The base GGUF with every tensor dequantised to float32 (the weights transformers loads from it), so that
    llama.cpp and multitune multiply the same numbers."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data.reshape([int(d) for d in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_adapter_as_multitune_does(tmp_path) -> None:
    from llama_cpp import Llama

    from multitune.models import load_base, resolve_source

    try:
        folder, name = resolve_source("smollm2-135m")
    except Exception as error:  # noqa: BLE001 - the model package is optional here
        pytest.skip(f"smollm2-135m not available: {error}")
    assert name is not None
    base_f32 = tmp_path / "base-f32.gguf"
    _f32_copy(str(folder / name), str(base_f32))
    bank = MultiTaskModel(load_base("smollm2-135m", device="cpu", dtype=torch.float32))
    torch.manual_seed(0)
    bank.add_task(
        "t", "generation", "lora", LoRAConfig(rank=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    perturb(bank, "t", seed=4, scale=0.05)
    adapter = export_gguf(bank, "t", tmp_path / "t.gguf")
    tokenizer = bank.base.tokenizer
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    tuned = Llama(model_path=str(base_f32), lora_path=str(adapter), n_ctx=128, n_threads=2, verbose=False,
                  logits_all=True)  # fmt: skip
    plain = Llama(model_path=str(base_f32), n_ctx=128, n_threads=2, verbose=False)
    changed = 0
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        batch = torch.tensor([ids])
        rows = bank.task_ids("t", 1)
        with torch.no_grad():
            ours = bank.generate(batch, torch.ones_like(batch), rows, max_new_tokens=12, do_sample=False)
            logits = bank.run(batch, torch.ones_like(batch), rows).out.logits[0, -1]
        ours_ids = ours[0].tolist()  # bank.generate returns the new tokens
        tuned.reset()
        tuned.eval(ids)
        theirs_logits = torch.tensor(tuned.scores[len(ids) - 1])
        torch.testing.assert_close(theirs_logits, logits, atol=2e-2, rtol=0)
        theirs = list(itertools.islice(tuned.generate(ids, temp=0.0, reset=True), 12))
        base = list(itertools.islice(plain.generate(ids, temp=0.0, reset=True), 12))
        eos = tokenizer.eos_token_id
        cut = ours_ids.index(eos) if eos in ours_ids else len(ours_ids)
        assert theirs[:cut] == ours_ids[:cut], (prompt, tokenizer.decode(theirs), tokenizer.decode(ours_ids))
        changed += base[:cut] != ours_ids[:cut]
    assert changed >= 2  # the adapter changes llama.cpp's greedy text: it was applied
