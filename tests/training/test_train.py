"""The training loop: learning on every family, full fine-tuning, early stopping, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, tiny_base, toy_generation, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.errors import ConfigError
from multitune.methods.full import FullConfig
from multitune.methods.lora import LoRAConfig
from multitune.training.evaluate import evaluate
from multitune.training.train import train


def _bank(family: str, kind: str = "classification", method: str = "lora", config=None) -> MultiTaskModel:
    torch.manual_seed(0)
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("t", kind, method, config, ["neg", "pos"] if kind == "classification" else None)
    return bank


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_classification_learns_the_toy_task(family: str) -> None:
    bank = _bank(family, config=LoRAConfig(rank=4, dropout=0.0))
    data = toy_sentiment(64)
    before = evaluate(bank, "t", data)["loss"]
    cfg = TrainConfig(epochs=8, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    result = train(bank, "t", data, data[:16], cfg, progress=False)
    after = evaluate(bank, "t", data)
    assert result.steps == 64
    assert after["loss"] < 0.5 * before
    assert after["accuracy"] >= 0.9


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_lora_generation_loss_decreases(family: str) -> None:
    bank = _bank(
        family, kind="generation", config=LoRAConfig(rank=4, dropout=0.0, target_modules=["all-linear"])
    )
    data = toy_generation(32)
    before = evaluate(bank, "t", data, generate=False)["loss"]
    cfg = TrainConfig(epochs=10, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, patience=100)
    train(bank, "t", data, data[:8], cfg, progress=False)
    after = evaluate(bank, "t", data, max_new_tokens=4)
    assert after["loss"] < 0.5 * before
    assert {"perplexity", "exact_match", "rouge_l"} <= set(after)


def test_full_fine_tuning_trains_every_weight_but_the_frozen_layers() -> None:
    bank = _bank("bert", method="full", config=FullConfig(freeze_layers=1))
    model = bank.base.model
    frozen = [p for p in model.encoder.layer[0].parameters()] + list(model.embeddings.parameters())
    trained = list(model.encoder.layer[1].parameters())
    before = [p.detach().clone() for p in frozen + trained]
    data = toy_sentiment(32)
    loss_before = evaluate(bank, "t", data)["loss"]
    cfg = TrainConfig(epochs=20, batch_size=8, learning_rate=3e-3, patience=100)
    train(bank, "t", data, data, cfg, progress=False)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before[: len(frozen)], strict=True))
    assert all(
        not torch.equal(p, b) for p, b in zip(trained, before[len(frozen) :], strict=True) if p.dim() > 1
    )
    after = evaluate(bank, "t", data)
    assert after["loss"] < 0.8 * loss_before and after["accuracy"] >= 0.75


def test_full_fine_tuning_owns_exactly_the_weights_that_feed_the_head() -> None:
    bank = _bank("bert", method="full")
    owned = bank.task_parameters("t")
    assert "pooler.dense.weight" not in owned and "encoder.layer.0.attention.self.query.weight" in owned
    assert (
        sum(p.numel() for p in owned.values())
        == sum(p.numel() for n, p in bank.base.model.named_parameters() if not n.startswith("pooler."))
        + 32 * 2
        + 2
    )


def test_the_same_seed_gives_the_same_weights() -> None:
    data = toy_sentiment(24)
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, seed=3)
    runs = []
    for _ in range(2):
        bank = _bank("gpt2", config=LoRAConfig(rank=2, dropout=0.2))
        train(bank, "t", data, data[:4], cfg, progress=False)
        runs.append(bank.task_state_dict("t"))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], atol=0, rtol=0)


def test_full_fine_tuning_needs_a_bank_of_its_own() -> None:
    bank = _bank("bert")
    with pytest.raises(ConfigError, match="bank of its own"):
        bank.add_task("f", "classification", "full", FullConfig(), ["a", "b"])
    with pytest.raises(ConfigError, match="has 2 layers"):
        MultiTaskModel(tiny_base("bert")).add_task(
            "f", "classification", "full", FullConfig(freeze_layers=5), ["a", "b"]
        )


def test_early_stopping_restores_the_best_weights(tmp_path) -> None:
    bank = _bank("bert", config=LoRAConfig(rank=4, dropout=0.0))
    data = toy_sentiment(32)
    # a learning rate this large makes the validation loss bounce: patience runs out, the best is restored
    cfg = TrainConfig(
        epochs=30, batch_size=8, learning_rate=0.5, eval_every=2, patience=2, metric="loss", warmup_ratio=0.0
    )
    result = train(bank, "t", data, data[:16], cfg, run_dir=tmp_path, progress=False)
    assert result.stopped_early
    assert result.steps < 30 * 4
    assert evaluate(bank, "t", data[:16])["loss"] == pytest.approx(result.best_metric, rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(2, result.steps + 1, 2))
    assert min(r["loss"] for r in lines) == pytest.approx(result.best_metric)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path, grad_accum: int) -> None:
    data = toy_sentiment(40)
    cfg = TrainConfig(
        epochs=3,
        batch_size=4,
        learning_rate=5e-3,
        eval_every=3,
        checkpoint_every=4,
        patience=100,
        grad_accum=grad_accum,
        seed=7,
    )
    lora = LoRAConfig(rank=4, dropout=0.3)  # dropout: the resumed run must replay the same RNG stream

    straight = _bank("llama", config=lora)
    train(straight, "t", data, data[:8], cfg, run_dir=tmp_path / "a", progress=False)

    def stop_at_step_10(step: int) -> None:
        if step == 10:
            raise Interrupt

    interrupted = _bank("llama", config=lora)
    with pytest.raises(Interrupt):
        train(
            interrupted,
            "t",
            data,
            data[:8],
            cfg,
            run_dir=tmp_path / "b",
            progress=False,
            on_step=stop_at_step_10,
        )
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["loop"]["step"] == 8
    resumed = _bank("llama", config=LoRAConfig(rank=4, dropout=0.3))
    torch.manual_seed(123)  # a different global RNG state: the checkpoint must restore its own
    train(resumed, "t", data, data[:8], cfg, run_dir=tmp_path / "b", resume=True, progress=False)

    want, got = straight.task_state_dict("t"), resumed.task_state_dict("t")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == (
        tmp_path / "b" / "metrics.jsonl"
    ).read_text().count("\n")
    leftovers = [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_resume_with_other_settings_is_refused(tmp_path) -> None:
    data = toy_sentiment(16)
    cfg = TrainConfig(epochs=1, batch_size=4, checkpoint_every=1)
    train(_bank("bert"), "t", data, data[:4], cfg, run_dir=tmp_path, progress=False)
    other = TrainConfig(epochs=1, batch_size=8, checkpoint_every=1)
    with pytest.raises(ConfigError, match="batch_size"):
        train(_bank("bert"), "t", data, data[:4], other, run_dir=tmp_path, resume=True, progress=False)


# ---- the run folder: `multitune train` ---------------------------------------------------------------------
def _csv(folder, n: int = 48) -> str:
    import csv

    path = folder / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(n)])
    return str(path)


def _train_argv(model_dir, data: str, out, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        data,
        "--output",
        str(out),
        "--method",
        "lora",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
        *extra,
    ]


def _tree(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_train_into_a_held_run_folder_is_refused_and_changes_nothing(
    bert_dir, tmp_path, capsys, resume
):
    from test_storage import _holder

    from multitune.cli import main

    data = _csv(tmp_path)
    out = tmp_path / "runs" / "run"
    holder = _holder(out)
    try:
        before = _tree(tmp_path)
        assert main(_train_argv(bert_dir, data, out, *(["--resume"] if resume else []))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert f"in use by multitune train --output {out} (process {holder.pid}" in err
        assert _tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(_train_argv(bert_dir, data, out)) == 0  # the holder is gone: its lock is taken over
    assert (out / "result.json").is_file()


def test_the_progress_bar_never_shows_an_epoch_past_the_last(capsys) -> None:
    import re

    data = toy_sentiment(16)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3)
    train(_bank("bert"), "t", data, data[:4], cfg, progress=True)
    shown = [(int(a), int(b)) for a, b in re.findall(r"epoch (\d+)/(\d+)", capsys.readouterr().err)]
    assert shown and all(1 <= a <= b == 2 for a, b in shown), shown
    assert shown[-1] == (2, 2)


@pytest.mark.parametrize(
    ("max_steps", "eval_every", "steps"),
    [
        (3, None, [3]),  # shorter than an epoch: scored at its last step
        (3, 2, [2, 3]),
        (None, 4, [4, 8, 10]),  # the last step of the last epoch, once
        (None, 5, [5, 10]),  # an eval_every step that is also the end: not scored twice
        (None, None, [10]),
    ],
)
def test_the_last_step_of_a_run_is_always_evaluated_once(tmp_path, max_steps, eval_every, steps) -> None:
    data = toy_sentiment(40)
    cfg = TrainConfig(epochs=1, batch_size=4, max_steps=max_steps, eval_every=eval_every, patience=100)
    result = train(_bank("bert"), "t", data, data[:8], cfg, run_dir=tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == steps
    assert result.best_metric is not None and result.steps == steps[-1]


def test_max_steps_shorter_than_an_epoch_gives_a_validation_score(bert_dir, tmp_path) -> None:
    from multitune.cli import main

    out = tmp_path / "run"
    assert main(_train_argv(bert_dir, _csv(tmp_path), out, "--max-steps", "2")) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["steps"] == 2 and summary["validation"]["accuracy"] is not None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]


def _stop_at(step: int):
    def on_step(now: int) -> None:
        if now == step:
            raise Interrupt

    return on_step


def _run_config(model_dir, data: str, out, **train):
    from multitune.config import DataConfig, RunConfig

    return RunConfig(
        model=str(model_dir),
        method="lora",
        output=str(out),
        data=DataConfig(data=data),
        train=TrainConfig(epochs=1, batch_size=8, **train),
    )


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (
            {"compare.json": "{}", "bank/task-lora/adapter.json": "{}"},
            "a comparison folder of 'multitune compare'",
        ),
        (
            {"result.json": '{"command": "dpo", "task": "t"}', "adapter/adapter.json": "{}"},
            "a run folder of 'multitune dpo'",
        ),
        ({"result.json": '{"tasks": {}}', "a/adapter.json": "{}"}, "a bank of 'multitune train-multi'"),
        ({"x/adapter.json": "{}"}, "a bank of adapter folders"),
        ({"notes.txt": "mine"}, "a folder of other files (notes.txt)"),
        (
            {"config.yaml": "model: minilm\nmethod: lora\ntrain: {}\n", "metrics.jsonl": ""},
            "a folder of other files",
        ),
    ],
)
def test_train_into_a_folder_of_something_else_is_refused_with_advice_that_fits_it(
    bert_dir, tmp_path, capsys, make, what
) -> None:
    """Its advice is never --resume (which wrote a run into a comparison folder), and --resume is refused too."""
    from multitune.cli import main

    data = _csv(tmp_path)
    out = tmp_path / "cmp"
    for name, text in make.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _tree(out)
    for extra in ([], ["--resume"]):
        assert main(_train_argv(bert_dir, data, out, *extra)) == 2
        err = capsys.readouterr().err
        assert what in err and "choose another --output" in err and "pass --resume" not in err, err
        assert _tree(out) == before
    assert main(_train_argv(bert_dir, data, tmp_path / "another")) == 0  # the advice, followed


def test_the_advice_to_resume_a_run_folder_works_as_printed_and_the_checkpoint_goes_at_the_end(
    bert_dir, tmp_path, capsys
) -> None:
    from multitune.cli import main
    from multitune.training.train import run

    data = _csv(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run(_run_config(bert_dir, data, out, checkpoint_every=1), progress=False, on_step=_stop_at(2))
    assert (out / "checkpoint" / "state.json").is_file()
    assert main(_train_argv(bert_dir, data, out)) == 2
    err = capsys.readouterr().err
    assert f"run folder {out} already exists; pass --resume" in err
    assert main(_train_argv(bert_dir, data, out, "--resume")) == 0  # as printed
    summary = json.loads((out / "result.json").read_text())
    assert summary["command"] == "train" and summary["steps"] == 5
    assert not (out / "checkpoint").exists()  # 1.2 MB beside a 300 kB adapter, for nothing
    assert main(_train_argv(bert_dir, data, out)) == 2  # a finished run: the same advice, which still works
    assert "pass --resume" in capsys.readouterr().err
    assert main(_train_argv(bert_dir, data, out, "--resume")) == 0
    assert json.loads((out / "result.json").read_text()) == summary


def test_keep_checkpoint_keeps_it_and_a_finished_run_resumes_to_its_result(bert_dir, tmp_path) -> None:
    from multitune.cli import main
    from multitune.training.train import run

    data = _csv(tmp_path)
    out = tmp_path / "run"
    summary = run(_run_config(bert_dir, data, out, keep_checkpoint=True), progress=False)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["loop"]["step"] == 5
    assert main(_train_argv(bert_dir, data, out, "--resume", "--keep-checkpoint")) == 0
    assert (out / "checkpoint").is_dir()
    assert run(_run_config(bert_dir, data, out), resume=True, progress=False) == summary
    assert not (out / "checkpoint").exists()  # resumed without the flag: the finished run's checkpoint goes


def test_an_output_that_is_a_file_is_one_error_line(bert_dir, tmp_path, capsys) -> None:
    from multitune.cli import main

    (tmp_path / "out").write_text("x")
    assert main(_train_argv(bert_dir, _csv(tmp_path), tmp_path / "out")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_the_leftovers_of_a_kill_during_the_final_save_go_on_resume(bert_dir, tmp_path) -> None:
    from multitune.cli import main
    from multitune.training.train import run

    data = _csv(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run(_run_config(bert_dir, data, out, checkpoint_every=1), progress=False, on_step=_stop_at(5))
    (out / ".adapter.tmp-k1ll3d").mkdir()  # what a SIGKILL inside save_adapter's atomic_dir leaves
    (out / ".result.json.tmp-k1ll3d").write_text("{")
    (out / ".checkpoint.old-k1ll3d").mkdir()
    assert main(_train_argv(bert_dir, data, out, "--resume")) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "config.yaml",
        "data",
        "metrics.jsonl",
        "result.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.csv", "run"]  # and the lock file is gone
