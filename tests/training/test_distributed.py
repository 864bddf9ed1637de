"""Data parallel training (issue 20): a 2-process gloo run under torchrun equals the 1-process run with the same
global batch, writes one adapter, leaves no scratch behind, and a batch that does not split is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny
from safetensors.torch import load_file

from multitune.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "health"))
from test_update import write_rows  # noqa: E402


def _flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--method", "lora", "--lora-dropout", "0",
            "--epochs", "2", "--max-length", "16", "--learning-rate", "0.01", "--output", str(out), "--quiet",
            *extra]  # fmt: skip


def _torchrun(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "multitune", *argv]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_the_one_process_run_and_write_one_adapter(tmp_path) -> None:
    model = save_tiny("llama", tmp_path / "llama")  # no dropout anywhere: the runs can be compared exactly
    data = write_rows(tmp_path / "rows.csv", 80, 0)
    one = tmp_path / "one"
    assert main(_flags(model, data, one, "--batch-size", "4", "--grad-accum", "2")) == 0
    two = tmp_path / "two"
    done = _torchrun(tmp_path, _flags(model, data, two, "--batch-size", "8"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained lora task") == 1  # rank 0 alone prints
    a, b = (
        load_file(str(one / "adapter" / "adapter.safetensors")),
        load_file(str(two / "adapter" / "adapter.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert any(b[k].abs().sum() > 0 for k in b if "lora_B" in k)  # it trained (B starts at zero)
    result_one, result_two = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert result_two["test"]["loss"] == pytest.approx(result_one["test"]["loss"], abs=1e-5)
    assert result_two["steps"] == result_one["steps"]
    assert not list((tmp_path / "tmp").glob("multitune-rank*"))  # rank 1's scratch folder is gone
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in one.iterdir() if not p.name.startswith(".")
    )


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path) -> None:
    model = save_tiny("llama", tmp_path / "llama")
    data = write_rows(tmp_path / "rows.csv", 40, 0)
    done = _torchrun(tmp_path, _flags(model, data, tmp_path / "out", "--batch-size", "5"))
    assert done.returncode != 0
    assert (
        "error: --batch-size 5 does not split over 2 processes; give a batch size divisible by 2"
        in done.stderr
    )
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("command", ["reward", "dpo", "train-multi"])
def test_reward_dpo_and_train_multi_under_torchrun_train_the_one_process_run(tmp_path, command) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "preference"))
    from test_preference import toy_pairs, write_jsonl

    model = save_tiny("llama", tmp_path / "llama")
    common = ["--model", str(model), "--epochs", "2", "--learning-rate", "0.01", "--quiet"]
    if command == "train-multi":
        data = write_rows(tmp_path / "rows.csv", 48, 0)
        (tmp_path / "multi.yaml").write_text(
            f"model: {model}\ntrain: {{epochs: 2, max_length: 16, learning_rate: 0.01}}\ntasks:\n"
            f"  - {{name: a, method: lora, lora_dropout: 0, data: {data}}}\n"
            f"  - {{name: b, method: ia3, data: {data}}}\n"
        )

        def argv(out: Path, *batch: str) -> list[str]:
            return [
                "train-multi",
                "--config",
                str(tmp_path / "multi.yaml"),
                "--output",
                str(out),
                "--quiet",
                *batch,
            ]
    else:
        rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in toy_pairs(24, 0)]
        pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)

        def argv(out: Path, *batch: str) -> list[str]:
            return [command, "--data", pairs, "--lora-dropout", "0", "--output", str(out), *common, *batch]

    one = tmp_path / "one"
    assert main(argv(one, "--batch-size", "4", "--grad-accum", "2")) == 0
    two = tmp_path / "two"
    done = _torchrun(tmp_path, argv(two, "--batch-size", "8"))
    assert done.returncode == 0, done.stderr[-3000:]
    adapters = sorted(p.parent.relative_to(one) for p in one.rglob("adapter.safetensors"))
    assert adapters == sorted(p.parent.relative_to(two) for p in two.rglob("adapter.safetensors"))
    assert adapters  # one adapter per task, written once
    for folder in adapters:
        a, b = (load_file(str(d / folder / "adapter.safetensors")) for d in (one, two))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5), (folder, key)
    assert not list((tmp_path / "tmp").glob("multitune-rank*"))
