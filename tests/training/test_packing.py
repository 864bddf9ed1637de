"""``--packing`` (issue 20): a generation batch's examples end to end in one row give the unpacked batch's loss
and gradients (no token attends across examples, positions restart), for LoRA, (IA)^3, adapters and full
fine-tuning; train runs with it; what cannot pack is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny

from multitune.bank import MultiTaskModel
from multitune.cli import main
from multitune.data import Example
from multitune.encode import collate, encode_task, pack, to_device
from multitune.models import load_base

EXAMPLES = [
    Example(text="good great fine", response="pos pos"),
    Example(text="bad", response="neg neg neg sad"),
    Example(text="the movie was good and fine", response="pos"),
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "full"])
def test_a_packed_batch_has_the_unpacked_loss_and_gradients(family, method, tmp_path) -> None:
    bank = MultiTaskModel(load_base(str(save_tiny(family, tmp_path / family))))
    bank.add_task("t", "generation", method)
    bank.eval()  # dropout off: both forwards see the same network
    for p in bank.task_parameters("t").values():  # every update away from zero, so each parameter matters
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 and method != "full" else None
    features = encode_task(bank, "t", EXAMPLES, 32)
    losses, grads = [], []
    for batch in (collate(features, bank.base.tokenizer.pad_token_id, 0), pack(features, 0)):
        bank.zero_grad()
        nll, count = bank.lm_loss(to_device(batch, bank.base.device))
        (nll / count).backward()
        losses.append((float(nll.detach()), int(count)))
        grads.append({k: p.grad.clone() for k, p in bank.task_parameters("t").items() if p.grad is not None})
    assert losses[0][1] == losses[1][1]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-5), key


def test_pack_restarts_positions_and_never_targets_across_examples() -> None:
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = pack(features, 2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 would be predicted from the other example
    assert batch["task_ids"].tolist() == [2]


def test_train_with_packing_and_its_refusals(tmp_path, capsys) -> None:
    model = str(save_tiny("llama", tmp_path / "llama"))
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": e.text, "response": e.response}) + "\n" for e in EXAMPLES * 10)
    )
    flags = ["train", "--model", model, "--kind", "generation", "--data", str(data), "--epochs", "1",
             "--max-length", "32", "--quiet", "--packing"]  # fmt: skip
    assert main([*flags, "--method", "lora", "--output", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "adapter").is_dir()
    capsys.readouterr()
    for extra, words in [
        (["--method", "prefix"], "not prompt, prefix or prompting"),
        (["--method", "lora", "--kind", "classification"], "needs --kind generation"),
    ]:
        assert main([*flags, *extra, "--output", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
