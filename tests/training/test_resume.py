"""Every trainer of the one loop resumes bit-identically: multi-task training, the reward model and DPO.

Each run is cut by an exception after an optimizer step, then resumed from its checkpoint under another
global RNG state; its weights must equal an uninterrupted run's exactly (dropout on, so the RNG stream and the
batches must be replayed too), and metrics.jsonl must hold the same evaluations.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import NEGATIVE, POSITIVE, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods.adapter import AdapterConfig
from multitune.methods.lora import LoRAConfig
from multitune.preference.dpo import train_dpo
from multitune.preference.pairs import Pair
from multitune.preference.reward import train_reward
from multitune.preference.scoring import add_reward_task
from multitune.training.multitask import train_multitask

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def _stop_at(step: int) -> Callable[[int], None]:
    def on_step(now: int) -> None:
        if now == step:
            raise Interrupt

    return on_step


def _pairs(n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    return [
        Pair(
            f"the {rng.choice(['movie', 'food', 'place'])} was",
            f"very {rng.choice(POSITIVE)}",
            f"very {rng.choice(NEGATIVE)}",
        )
        for _ in range(n)
    ]


def _same(a: MultiTaskModel, b: MultiTaskModel, tasks: list[str]) -> None:
    for task in tasks:
        want, got = a.task_state_dict(task), b.task_state_dict(task)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=f"{task} {key}")


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _multi_bank() -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("sent", "classification", "lora", LoRAConfig(rank=4, dropout=0.3), ["neg", "pos"])
    bank.add_task("reply", "generation", "adapter", AdapterConfig(reduction_factor=4))
    return bank


def test_an_interrupted_multi_task_run_resumes_to_the_same_weights(tmp_path) -> None:
    data = {
        "sent": (toy_sentiment(40), toy_sentiment(8, seed=1)),
        "reply": (toy_generation(24), toy_generation(6)),
    }
    cfg = TrainConfig(
        epochs=3,
        batch_size=6,
        learning_rate=1e-2,
        eval_every=3,
        checkpoint_every=4,
        patience=100,
        grad_accum=2,
        seed=3,
    )
    straight = _multi_bank()
    train_multitask(straight, data, cfg, sampling="temperature", run_dir=tmp_path / "a", progress=False)

    cut = _multi_bank()
    with pytest.raises(Interrupt):
        train_multitask(
            cut,
            data,
            cfg,
            sampling="temperature",
            run_dir=tmp_path / "b",
            progress=False,
            on_step=_stop_at(10),
        )
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["loop"]["step"] == 8
    resumed = _multi_bank()
    torch.manual_seed(123)  # another global RNG state: the checkpoint restores the run's own
    results = train_multitask(
        resumed, data, cfg, sampling="temperature", run_dir=tmp_path / "b", resume=True, progress=False
    )
    _same(straight, resumed, ["sent", "reply"])
    assert _lines(tmp_path / "a") == [
        {**r, "elapsed": _lines(tmp_path / "a")[i]["elapsed"]} for i, r in enumerate(_lines(tmp_path / "b"))
    ]
    assert {r["task"] for r in _lines(tmp_path / "b")} == {"sent", "reply"}
    assert results["sent"].steps == results["reply"].steps > 10


def _reward_bank() -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    add_reward_task(bank, "rm", "lora", LoRAConfig(rank=4, dropout=0.3))
    return bank


def _policy_bank() -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("pol", "generation", "lora", LoRAConfig(rank=4, dropout=0.3))
    return bank


@pytest.mark.parametrize("trainer", ["reward", "dpo"])
def test_an_interrupted_preference_run_resumes_to_the_same_weights(trainer: str, tmp_path) -> None:
    pairs, held = _pairs(24, 0), _pairs(8, 1)
    cfg = TrainConfig(
        epochs=3, batch_size=4, learning_rate=1e-2, eval_every=2, checkpoint_every=3, patience=100, seed=5
    )
    make, task = (_reward_bank, "rm") if trainer == "reward" else (_policy_bank, "pol")

    def run(bank: MultiTaskModel, folder: Path, **kwargs) -> dict:
        if trainer == "reward":
            return train_reward(bank, task, pairs, held, cfg, progress=False, run_dir=folder, **kwargs)
        return train_dpo(bank, task, pairs, held, cfg, beta=0.5, progress=False, run_dir=folder, **kwargs)

    straight = make()
    want = run(straight, tmp_path / "a")
    cut = make()
    with pytest.raises(Interrupt):
        run(cut, tmp_path / "b", on_step=_stop_at(7))
    resumed = make()
    torch.manual_seed(99)
    got = run(resumed, tmp_path / "b", resume=True)
    _same(straight, resumed, [task])
    assert [e["accuracy"] for e in got["evals"]] == [e["accuracy"] for e in want["evals"]]
    assert got["before"]["step"] == 0 and got["best_step"] == want["best_step"]
    assert [r["loss"] for r in got["history"]] == [r["loss"] for r in want["history"]]
    assert len(_lines(tmp_path / "b")) == len(_lines(tmp_path / "a")) == len(want["evals"])


def test_a_checkpoint_of_other_settings_is_refused(tmp_path) -> None:
    pairs, held = _pairs(16, 0), _pairs(4, 1)
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, checkpoint_every=1, seed=5)
    with pytest.raises(Interrupt):
        train_reward(
            _reward_bank(), "rm", pairs, held, cfg, progress=False, run_dir=tmp_path, on_step=_stop_at(2)
        )
    other = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, checkpoint_every=1, seed=5)
    with pytest.raises(ConfigError, match="other settings \\(batch_size\\)"):
        train_reward(_reward_bank(), "rm", pairs, held, other, progress=False, run_dir=tmp_path, resume=True)


def test_the_cli_resumes_only_its_own_runs(llama_dir, tmp_path, capsys) -> None:
    from multitune.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in _pairs(12, 0)
        )
    )
    args = [
        "--data",
        str(data),
        "--model",
        str(llama_dir),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--quiet",
    ]
    out = tmp_path / "rm"
    assert main(["reward", *args, "--output", str(out)]) == 0
    assert main(["reward", *args, "--output", str(out)]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert (
        main(["reward", *args, "--output", str(out), "--resume"]) == 0
    )  # finished: its result, nothing redone
    assert "finished in an earlier run" in capsys.readouterr().out
    assert main(["dpo", *args, "--output", str(out), "--resume"]) == 2
    assert "--resume continues a run of 'multitune dpo'" in capsys.readouterr().err
    assert not (out / "checkpoint").exists()


def test_train_multi_resumes_from_the_command_line(llama_dir, tmp_path, monkeypatch, capsys) -> None:
    import functools

    import yaml

    from multitune.cli import main
    from multitune.training import multitask

    data = tmp_path / "sent.csv"
    data.write_text("text,label\n" + "".join(f"{ex.text},{ex.label}\n" for ex in toy_sentiment(48)))
    replies = tmp_path / "reply.jsonl"
    replies.write_text(
        "".join(json.dumps({"prompt": ex.text, "response": ex.response}) + "\n" for ex in toy_generation(24))
    )
    config = tmp_path / "multi.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(llama_dir),
                "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "seed": 1},
                "tasks": [
                    {"name": "sent", "method": "lora", "data": str(data), "lora_dropout": 0.3},
                    {"name": "reply", "method": "prompt", "kind": "generation", "data": str(replies)},
                ],
            }
        )
    )
    args = ["train-multi", "--config", str(config), "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    original = multitask.train_multitask
    monkeypatch.setattr(multitask, "train_multitask", functools.partial(original, on_step=_stop_at(5)))
    with pytest.raises(Interrupt):
        main([*args, "--output", str(tmp_path / "b")])
    assert main([*args, "--output", str(tmp_path / "b")]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    monkeypatch.setattr(multitask, "train_multitask", original)
    assert main([*args, "--output", str(tmp_path / "b"), "--resume"]) == 0
    for task in ("sent", "reply"):
        want = (tmp_path / "a" / task / "adapter.safetensors").read_bytes()
        assert (tmp_path / "b" / task / "adapter.safetensors").read_bytes() == want
    assert not (tmp_path / "b" / "checkpoint").exists()
    assert main([*args, "--output", str(tmp_path / "b"), "--resume"]) == 0  # finished: its result again
