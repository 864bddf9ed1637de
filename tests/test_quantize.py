"""A quantized frozen base (``--quantize nf4|fp4|int8``): every adapter method trains and mixes over it.

Tiny random models with their linear layers put in bitsandbytes' 4- and 8-bit layers on CPU. Each trainable
method must lower its loss over 20 steps over an nf4 and an int8 base, and a batch mixing two tasks must
give each row what its task gives alone (atol 1e-5). The weights must really be stored in 4 or 8 bits; what
would write the base (merging, full fine-tuning) is refused with the fix; a saved run loads onto a base
quantized again the same way.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import perturb, tiny_base, toy_sentiment
from torch import nn

pytest.importorskip("bitsandbytes")

import bitsandbytes as bnb  # noqa: E402  (after the skip: the extra may be absent)

from multitune.bank import MultiTaskModel  # noqa: E402
from multitune.cli import main  # noqa: E402
from multitune.errors import ConfigError  # noqa: E402
from multitune.methods import METHODS  # noqa: E402
from multitune.methods.lora import LoRALinear  # noqa: E402
from multitune.quantize import quantize_base, resident_bytes  # noqa: E402

KINDS = ["nf4", "int8"]
LAYER = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
# every method with its own tensors over a shared base: prompting has none, full writes the base
TRAINABLE = sorted(n for n, m in METHODS.items() if not m.changes_base and n not in ("base", "prompting"))
TEXTS = [
    "good movie",
    "the film was very bad and not nice",
    "so happy and great",
    "not bad",
    "love it",
    "what",
]


def quantized(family: str, kind: str) -> MultiTaskModel:
    base = tiny_base(family)
    quantize_base(base, kind)
    return MultiTaskModel(base)


def _logits(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> torch.Tensor:
    enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt")
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    return bank.classify(enc.input_ids, enc.attention_mask, rows)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_the_blocks_linear_layers_are_stored_in_4_or_8_bits_and_the_lm_head_is_not(kind: str) -> None:
    plain = tiny_base("llama")
    before = resident_bytes(plain.model)
    base = tiny_base("llama")
    quantize_base(base, kind)
    model = base.model
    assert base.quantize == kind
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    blocks = {n: m for n, m in layers.items() if m is not head}
    assert len(blocks) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, layer in blocks.items():
        assert type(layer) is LAYER[kind], name
        numel = layer.in_features * layer.out_features
        stored = layer.weight.numel() * layer.weight.element_size()
        assert stored == (numel // 2 if kind != "int8" else numel), name  # 4 bits packed two a byte / 1 byte
        assert not layer.weight.requires_grad
    # what the blocks' weights take now, statistics included: 4 bits a weight, a byte of absmax per 64 and
    # bitsandbytes' 256-entry code table per layer (1 KiB, small beside a real layer); int8: a scale per row
    numel = sum(m.in_features * m.out_features for m in blocks.values())
    if kind == "int8":
        bound = numel + sum(4 * m.out_features for m in blocks.values())
    else:
        bound = numel // 2 + numel // 64 + 1100 * len(blocks)
    saved = before - resident_bytes(model)  # embeddings and LM head (most of a tiny model) stay float32
    assert 4 * numel - bound <= saved < 4 * numel


def _train(bank: MultiTaskModel, task: str, steps: int = 20) -> list[float]:
    data = toy_sentiment(16)
    labels = torch.tensor([0 if ex.label == "neg" else 1 for ex in data])
    texts = [ex.text for ex in data]
    params = list(bank.task_parameters(task).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    bank.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(_logits(bank, texts, [task] * len(texts)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    bank.eval()
    return losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", TRAINABLE)
def test_every_method_trains_over_a_quantized_base(method: str, kind: str) -> None:
    torch.manual_seed(0)
    bank = quantized("llama", kind)
    bank.add_task("t", "classification", method, None, ["neg", "pos"])
    losses = _train(bank, "t")
    assert losses[-1] < 0.7 * losses[0], losses
    for layer in bank.base.model.modules():  # the base took no gradient
        if isinstance(layer, LAYER[kind]):
            assert layer.weight.grad is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_mixed_batch_of_every_method_over_a_quantized_base_equals_each_row_alone(
    family: str, kind: str
) -> None:
    bank = quantized(family, kind)
    for i, method in enumerate(TRAINABLE):
        bank.add_task(method, "classification", method, None, ["neg", "pos", "x"][: 2 + i % 2])
        perturb(bank, method, i, scale=0.15)
    assert any(isinstance(m, LoRALinear) and isinstance(m.base_layer, LAYER[kind]) for m in bank.modules())
    tasks = (TRAINABLE * 2)[:10]
    texts = (TEXTS * 2)[: len(tasks)]
    with torch.no_grad():
        mixed = _logits(bank, texts, tasks)
        for i, task in enumerate(tasks):
            alone = _logits(bank, [texts[i]], [task])
            torch.testing.assert_close(mixed[i : i + 1, : alone.shape[1]], alone, atol=1e-5, rtol=0)
        # and the tasks really differ from the bare quantized base
        with bank.disabled():
            bare = _logits(bank, texts[:1], tasks[:1])
        assert not torch.allclose(bare[:, :2], mixed[:1, :2], atol=1e-3)


def test_merging_into_and_full_fine_tuning_of_a_quantized_base_are_refused_with_the_fix() -> None:
    bank = quantized("llama", "nf4")
    bank.add_task("a", "classification", "lora", None, ["neg", "pos"])
    with pytest.raises(ConfigError, match="cannot merge 'a' into a base quantized to nf4.*drop --quantize"):
        bank.merge("a")
    bank.remove_task("a")
    with pytest.raises(ConfigError, match="full trains the base's weights.*drop --quantize"):
        bank.add_task("b", "classification", "full", None, ["neg", "pos"])


def _csv(path, n: int = 48) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(n)])
    return str(path)


def test_a_run_records_its_quantization_and_loads_onto_a_base_quantized_again(
    llama_dir, tmp_path, capsys
) -> None:
    from multitune.api import load

    data, out = _csv(tmp_path / "d.csv"), tmp_path / "run"
    argv = ["train", "--model", str(llama_dir), "--data", data, "--output", str(out), "--quiet"]
    assert main([*argv, "--method", "lora", "--epochs", "2", "--batch-size", "8", "--quantize", "int8"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["quantize"] == "int8"
    assert json.loads((out / "result.json").read_text())["quantize"] == "int8"
    assert json.loads((out / "adapter" / "adapter.json").read_text())["base_quantize"] == "int8"
    task = load(out)
    kinds = {type(m) for m in task.bank.base.model.modules()}
    assert bnb.nn.Linear8bitLt in kinds and task.bank.base.quantize == "int8"
    texts = ["good movie", "bad film"]
    assert task.predict(texts) == load(out).predict(texts)  # the same quantized function each load
    from multitune.serve.engine import Engine

    engine = Engine.from_folder(out)  # serve: the recorded quantization, or the one asked for
    assert engine.base.quantize == "int8"
    assert Engine.from_folder(out, quantize="nf4").base.quantize == "nf4"
    capsys.readouterr()
    # full fine-tuning of a quantized base fails before the model loads, in one line naming the fix
    assert main([*argv, "--method", "full", "--quantize", "nf4"]) == 2
    assert "drop --quantize" in capsys.readouterr().err
    assert main([*argv, "--quantize", "int4"]) == 2
    assert "quantize must be nf4, fp4 or int8" in capsys.readouterr().err


def test_compare_refuses_full_fine_tuning_over_a_quantized_base_before_anything_loads() -> None:
    from multitune.compare.run import validate
    from multitune.compare.settings import CompareConfig
    from multitune.config import TrainConfig

    with pytest.raises(ConfigError, match="drop full from --methods or drop --quantize"):
        validate(CompareConfig(methods=["lora", "full"], train=TrainConfig(quantize="nf4")))
    validate(CompareConfig(methods=["lora", "prompt"], train=TrainConfig(quantize="nf4")))


def test_importing_peft_after_multitune_prints_no_bitsandbytes_kernel_warning() -> None:
    """transformers imports peft, which imports bitsandbytes, on every model load: its CPU backend's warning that
    an optional hub kernel could not be fetched must not reach a user's terminal on every command."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = "import multitune, bitsandbytes, peft"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in quiet.stderr, quiet.stderr
