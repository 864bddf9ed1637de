"""Output folders on disk: the exclusive lock of a command's output folder and the leftovers of killed writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from multitune.storage import (
    FolderInUse,
    atomic_dir,
    is_locked,
    lock_path,
    output_lock,
    remove_stale_temporaries,
)

HOLD = textwrap.dedent("""
    import sys, time
    from multitune.storage import output_lock
    with output_lock(sys.argv[1], "multitune train --output " + sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(folder: Path) -> subprocess.Popen:
    """A process that takes the lock on ``folder`` and keeps it until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder.parent)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.parent.rglob("*"))
    }


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        (out / "metrics.jsonl").write_text("{}\n")
        before = _snapshot(out)
        with pytest.raises(FolderInUse) as info, output_lock(out, "multitune train"):
            pytest.fail("the lock was given twice")
        message = str(info.value)
        assert f"process {holder.pid}" in message and "multitune train --output" in message
        assert "choose another --output" in message and "\n" not in message
        assert _snapshot(out) == before
        assert is_locked(out)
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # the file stays behind a SIGKILL
    assert not is_locked(out)
    with output_lock(out, "multitune train") as folder:
        assert folder == out and is_locked(out)
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists() and not is_locked(out)


def test_the_lock_is_released_when_the_block_fails_and_an_empty_new_folder_is_removed(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), output_lock(out, "x"):
        assert out.is_dir()
        raise RuntimeError
    assert not out.exists() and not lock_path(out).exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with output_lock(kept, "x"):
        pass
    assert kept.is_dir()  # it existed before: never removed
    with output_lock(kept, "x"), output_lock(tmp_path / "other", "y"):  # two folders at once: two locks
        assert is_locked(kept) and is_locked(tmp_path / "other")


def test_a_lock_file_of_another_program_does_not_crash_the_refusal(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock_path(out).write_text("not json")
    with output_lock(out, "x"):  # not held by anyone: taken over
        pass
    script = textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"garbage")
        print("held", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(lock_path(out))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match="in use by another process"), output_lock(out, "x"):
            pass
    finally:
        process.kill()
        process.wait()


def _killed_writes(folder: Path) -> None:
    """What kills at each point of atomic_dir and write_json_atomic leave behind."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter.json").write_text("new")
    (folder / ".adapter.tmp-abc").mkdir()  # killed while writing the new adapter
    (folder / ".result.json.tmp-xyz").write_text("{")  # killed while writing result.json
    (folder / ".checkpoint.old-1" / "x").mkdir(parents=True)  # killed between the swap's two renames
    (folder / ".checkpoint.old-1" / "x" / "state.json").write_text("previous")
    (folder / ".checkpoint.tmp-2").mkdir()
    (folder / "bank" / ".task.tmp-3").mkdir(parents=True)  # deeper down too


def test_stale_temporaries_are_removed_when_the_lock_is_taken(tmp_path):
    out = tmp_path / "run"
    _killed_writes(out)
    (tmp_path / ".run.tmp-9").mkdir()  # an atomic write of the whole folder, killed
    (tmp_path / ".other.tmp-9").mkdir()  # another folder's: not ours to touch
    (out / ".hidden").write_text("a user's file")
    (out / ".notes.tmp").write_text("a user's file")  # not a temporary's name
    (out / "bank" / "t" / ".deep.tmp-1").mkdir(parents=True)  # deeper than multitune writes: left alone
    with output_lock(out, "x"):
        names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert names == [
        ".other.tmp-9",
        ".run.lock",
        "run",
        "run/.hidden",
        "run/.notes.tmp",
        "run/adapter",
        "run/adapter/adapter.json",
        "run/bank",
        "run/bank/t",
        "run/bank/t/.deep.tmp-1",
        "run/checkpoint",
        "run/checkpoint/state.json",
    ]
    assert (out / "checkpoint" / "state.json").read_text() == "previous"  # the swap's old side is put back
    assert (out / "adapter" / "adapter.json").read_text() == "new"


def test_temporaries_of_a_folder_another_process_holds_are_left_alone(tmp_path):
    out = tmp_path / "demo"
    inner = out / "compare"
    holder = _holder(inner)
    (inner / ".results.tmp-1").mkdir()  # the holder's own write in progress
    try:
        assert remove_stale_temporaries(out) == []
        assert (inner / ".results.tmp-1").is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_temporaries(out) == [inner / ".results.tmp-1"]


def test_a_failed_atomic_write_leaves_nothing_and_a_good_one_no_temporary(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise ValueError
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# ---- file modes: the umask, not mkstemp's 0600 / mkdtemp's 0700 ------------------------------------------
@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mode & 0o777
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


def _want(folder: Path, mask: int) -> dict[str, int]:
    return {name: (0o777 if (folder / name).is_dir() else 0o666) & ~mask for name in _modes(folder)}


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from multitune.storage import umask as read_umask
    from multitune.storage import write_bytes_atomic, write_json_atomic

    assert read_umask() == umask
    with atomic_dir(tmp_path / "adapter") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp / "adapter.safetensors"))  # safetensors itself writes 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    write_json_atomic(tmp_path / "result.json", {"a": 1})
    write_bytes_atomic(tmp_path / "report.html", b"<html>")
    modes = _modes(tmp_path)
    assert modes == _want(tmp_path, umask), {k: oct(v) for k, v in modes.items()}
    assert modes["adapter"] == (0o755 if umask == 0o022 else 0o750)
    assert modes["result.json"] == (0o644 if umask == 0o022 else 0o640)


def test_a_failed_json_write_leaves_no_temporary(tmp_path):
    from multitune.storage import write_json_atomic

    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "result.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_and_a_report_are_readable_by_the_group(bert_dir, tmp_path, umask):
    """Every file a run writes (config, metrics, checkpoint, adapter, result) and the report's files."""
    from helpers import toy_sentiment

    from multitune.compare.report import write_report
    from multitune.config import DataConfig, RunConfig, TrainConfig
    from multitune.training.train import run

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in toy_sentiment(32))
    )
    out = tmp_path / "run"
    run(
        RunConfig(
            model=str(bert_dir),
            output=str(out),
            data=DataConfig(data=str(data)),
            train=TrainConfig(epochs=1, batch_size=8, keep_checkpoint=True),
        ),
        progress=False,
    )
    assert {"adapter/adapter.safetensors", "checkpoint/state.safetensors", "result.json"} <= set(_modes(out))
    assert _modes(out) == _want(out, umask), {k: oct(v) for k, v in _modes(out).items()}
    report = tmp_path / "cmp"
    write_report(
        report,
        [
            {
                "method": "lora",
                "metric": "accuracy",
                "test": {"accuracy": 0.5},
                "trainable_parameters": 10,
                "stored_bytes": 100,
            }
        ],
        {"metric": "accuracy"},
    )
    assert _modes(report) == _want(report, umask)


def test_the_dequantised_gguf_cache_is_readable_by_the_group(tmp_path, umask, monkeypatch):
    from helpers import tiny_model, word_tokenizer

    from multitune.models import _save_cache

    _save_cache(tiny_model("llama"), word_tokenizer(), tmp_path / "gguf" / "m-1-2")
    assert _modes(tmp_path) == _want(tmp_path, umask)


# ---- adapter documents: validated on every read, and tied to their base -----------------------------------
def _saved_adapter(folder: Path, family: str = "bert", method: str = "lora", base=None) -> Path:
    import torch
    from helpers import tiny_base

    from multitune.bank import MultiTaskModel
    from multitune.storage import save_adapter

    torch.manual_seed(0)
    bank = MultiTaskModel(base or tiny_base(family))
    bank.add_task("t", "classification", method, None, ["neg", "pos"])
    return save_adapter(bank, "t", folder)


def _edit(folder: Path, change) -> None:
    meta = json.loads((folder / "adapter.json").read_text())
    change(meta)
    (folder / "adapter.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m["task"].pop("config"), "field 'task.config' is missing"),
        (lambda m: m["task"]["config"].update(bogus=1), "setting(s) 'bogus' that lora does not know"),
        (lambda m: m["task"]["config"].update(rank="8"), "task.config.rank have a value of the wrong type"),
        (lambda m: m["task"]["config"].update(rank=0), "task.config: lora rank must be >= 1"),
        (
            lambda m: m["task"].update(kind="regression"),
            "field 'task.kind' is not one of classification, generation",
        ),
        (lambda m: m["task"].update(method="nope"), "field 'task.method' is not one of"),
        (lambda m: m["task"].pop("name"), "field 'task.name' is missing"),
        (lambda m: m["task"].update(labels="neg,pos"), "field 'task.labels' is not a list of strings"),
        (lambda m: m["task"].update(labels=["one"]), "needs at least 2 labels"),
        (lambda m: m.pop("task"), "field 'task' is missing"),
        (lambda m: m.update(version=99), "newer multitune (version 99"),
        (lambda m: m.pop("base_model"), "field 'base_model' is missing"),
    ],
)
def test_a_damaged_adapter_document_is_one_line_naming_the_field_and_the_file(tmp_path, change, expected):
    from helpers import tiny_base

    from multitune.bank import MultiTaskModel
    from multitune.errors import ConfigError
    from multitune.storage import load_adapter

    folder = _saved_adapter(tmp_path / "adapter")
    _edit(folder, change)
    bank = MultiTaskModel(tiny_base("bert"))
    with pytest.raises(ConfigError) as info:
        load_adapter(bank, folder)
    message = str(info.value)
    assert expected in message and str(folder / "adapter.json") in message and "\n" not in message, message
    assert bank.tasks == {}  # nothing half-added


@pytest.mark.parametrize(
    "document",
    [
        {"format": "SECRET-VALUE-123"},
        ["SECRET-VALUE-123"],
        "SECRET-VALUE-123",
        {"SECRET-VALUE-123": 1},
    ],
)
def test_a_foreign_json_file_is_refused_without_echoing_it(tmp_path, document):
    from multitune.errors import ConfigError
    from multitune.storage import read_adapter_config

    (tmp_path / "adapter.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError) as info:
        read_adapter_config(tmp_path)
    assert "is not a multitune adapter (no format 'multitune-adapter')" in str(info.value)
    assert "SECRET" not in str(info.value)
    (tmp_path / "adapter.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="UTF-8"):
        read_adapter_config(tmp_path)


def _bert_with_tokenizer(shuffle: bool = False, hidden: int = 32):
    """A tiny bert whose vocabulary has the same size, but (shuffled) other token ids: every shape fits."""
    import random

    import transformers as t
    from helpers import WORDS, word_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    from multitune.models import base_from_model

    config = t.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    tokenizer = word_tokenizer()
    if shuffle:
        words = list(WORDS)
        random.Random(1).shuffle(words)
        vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", *words])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = t.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    return base_from_model(t.BertModel(config), tokenizer, source="other-bert")


def test_an_adapter_of_another_base_is_refused_naming_both_bases(tmp_path):
    from helpers import tiny_base

    from multitune.bank import MultiTaskModel
    from multitune.errors import ModelError
    from multitune.storage import load_adapter

    folder = _saved_adapter(tmp_path / "adapter")
    assert json.loads((folder / "adapter.json").read_text())["base"] == tiny_base("bert").fingerprint
    for other, differ in (
        (_bert_with_tokenizer(shuffle=True), "tokenizer"),
        (tiny_base("gpt2"), "model_type"),
    ):
        bank = MultiTaskModel(other)
        with pytest.raises(ModelError) as info:
            load_adapter(bank, folder)
        message = str(info.value)
        assert "trained on 'tiny-bert'" in message and f"the base loaded is '{other.source}'" in message
        assert differ in message and bank.tasks == {}
    load_adapter(MultiTaskModel(_bert_with_tokenizer()), folder)  # another source, the same model: loads


def test_an_adapter_saved_before_fingerprints_is_checked_on_its_model_type(tmp_path):
    from helpers import tiny_base

    from multitune.bank import MultiTaskModel
    from multitune.errors import ModelError
    from multitune.storage import load_adapter

    folder = _saved_adapter(tmp_path / "adapter")
    _edit(folder, lambda m: m.pop("base"))
    load_adapter(MultiTaskModel(_bert_with_tokenizer(shuffle=True)), folder)  # nothing else recorded: loads
    with pytest.raises(ModelError, match="model_type bert.*model_type gpt2"):
        load_adapter(MultiTaskModel(tiny_base("gpt2")), folder)


def test_every_command_that_reads_an_adapter_gives_the_one_line(bert_dir, tmp_path, capsys):
    """eval, predict, export-peft and the Python API, on a run whose adapter.json lost task.config."""
    import shutil

    from helpers import toy_sentiment

    import multitune
    from multitune.cli import main
    from multitune.errors import ConfigError

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"{ex.text},{ex.label}\n" for ex in toy_sentiment(32)))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(bert_dir),
                "--data",
                str(data),
                "--output",
                str(run),
                "--epochs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    _edit(run / "adapter", lambda m: m["task"].pop("config"))
    capsys.readouterr()
    for argv in (
        ["eval", str(run)],
        ["predict", str(run), "--input", str(data), "--output", str(tmp_path / "p.csv")],
        ["export-peft", str(run), "--output", str(tmp_path / "peft")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "field 'task.config' is missing" in err, (argv, err)
    with pytest.raises(ConfigError, match="task.config"):
        multitune.load(run)
    # --model pointing at another copy of the same base: the same fingerprint, it loads
    shutil.copytree(bert_dir, tmp_path / "moved")
    _edit(run / "adapter", lambda m: m["task"].update(config={}))
    assert multitune.load(run, model=str(tmp_path / "moved")).predict(["good movie"])[0] in ("neg", "pos")
