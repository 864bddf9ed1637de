"""What a served folder may be (Engine.from_folder, multitune serve): a bank of task folders, a folder of run
folders, one run folder, one adapter folder, several paths; hidden folders are never tasks; a name twice, or
adapters of different bases, are refused before any model loads. Classification inputs are cut to the task's
training max_length, and the answer says which were."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import WORDS, perturb, save_tiny

import multitune.serve.engine as engine_module
from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.methods.lora import LoRAConfig
from multitune.models import load_base
from multitune.serve.engine import Engine, find_adapters
from multitune.storage import save_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapter folders on one tiny llama: two classification tasks and a generation task."""
    root = tmp_path_factory.mktemp("folders")
    model = save_tiny("llama", root / "llama")
    bank = MultiTaskModel(load_base(str(model), device="cpu"))
    bank.add_task("sent", "classification", "lora", LoRAConfig(rank=2), ["neg", "pos"])
    bank.add_task("topic", "classification", "lora", LoRAConfig(rank=2), ["a", "b", "c"])
    bank.add_task("gen", "generation", "lora", LoRAConfig(rank=2))
    for seed, task in enumerate(bank.tasks):
        perturb(bank, task, seed=seed)
        save_adapter(bank, task, root / "saved" / task)
    return root / "saved"


def run_folder(adapter, run, max_length: int | None = None):
    """``run`` laid out as 'multitune train --output run' writes it: run/adapter/ (+ config.yaml)."""
    shutil.copytree(adapter, run / "adapter")
    if max_length is not None:
        (run / "config.yaml").write_text(f"train:\n  max_length: {max_length}\n")
    return run


def test_a_folder_of_run_folders_names_each_task_after_its_run(adapters, tmp_path):
    bank = tmp_path / "runs"
    run_folder(adapters / "sent", bank / "subj")  # the adapter records "sent": the folder's name wins
    run_folder(adapters / "gen", bank / "writer")
    (bank / "notes").mkdir()  # a folder without an adapter (a run still training) is not a task
    engine = Engine.from_folder(bank, device="cpu")
    assert set(engine.tasks) == {"subj", "writer"}
    assert engine.tasks["subj"].kind == "classification" and engine.tasks["writer"].kind == "generation"


def test_one_run_folder_one_adapter_folder_and_several_paths(adapters, tmp_path):
    run = run_folder(adapters / "sent", tmp_path / "one-run")
    assert set(Engine.from_folder(run, device="cpu").tasks) == {"one-run"}
    assert set(Engine.from_folder(run / "adapter", device="cpu").tasks) == {"one-run"}
    assert set(Engine.from_folder(adapters / "topic", device="cpu").tasks) == {"topic"}
    bank = tmp_path / "bank"
    shutil.copytree(adapters / "gen", bank / "gen")
    engine = Engine.from_folder([run, bank, adapters / "topic"], device="cpu")
    assert set(engine.tasks) == {"one-run", "gen", "topic"}
    assert engine.sources["one-run"] == str(run) and engine.adapters["one-run"] == run / "adapter"


def test_hidden_folders_are_never_tasks(adapters, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(adapters / "sent", bank / "sent")
    shutil.copytree(adapters / "topic", bank / ".topic.tmp-abc123")  # an interrupted atomic save
    shutil.copytree(adapters / "gen", bank / ".hidden" / "adapter")
    (bank / ".sent.lock").write_text("{}")
    assert set(find_adapters(bank)) == {"sent"}


def test_two_tasks_of_one_name_are_refused(adapters, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(adapters / "sent", first / "same")
    run_folder(adapters / "topic", second / "same")
    with pytest.raises(ConfigError, match="two tasks are named 'same'") as error:
        Engine.from_folder([first, second], device="cpu")
    assert str(first / "same") in str(error.value) and str(second / "same") in str(error.value)
    # the same folder given twice is one task, not a clash
    assert set(find_adapters([first, first / "same"])) == {"same"}


def test_nothing_to_serve_says_what_a_folder_may_hold(tmp_path):
    (tmp_path / "cmp" / "bank").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no adapter folders") as error:
        find_adapters(tmp_path / "cmp")
    assert "did you mean" in str(error.value) and str(tmp_path / "cmp" / "bank") in str(error.value)
    with pytest.raises(ConfigError, match="is not a folder"):
        find_adapters(tmp_path / "missing")


def test_mixed_bases_are_refused_before_loading_naming_them(adapters, tmp_path, monkeypatch):
    bank = tmp_path / "bank"
    shutil.copytree(adapters / "sent", bank / "sent")
    shutil.copytree(adapters / "gen", bank / "gen")
    meta = json.loads((bank / "gen" / "adapter.json").read_text())
    meta["base_model"] = "some-other-base"
    (bank / "gen" / "adapter.json").write_text(json.dumps(meta))
    loaded = []
    monkeypatch.setattr(engine_module, "load_base", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="mix base models") as error:
        Engine.from_folder(bank, device="cpu")
    message = str(error.value)
    assert "'some-other-base' (gen)" in message and "(sent)" in message and not loaded


def test_load_takes_a_run_folder(adapters, tmp_path):
    run = run_folder(adapters / "gen", tmp_path / "later")
    engine = Engine.from_folder(adapters / "sent", device="cpu")
    spec = engine.load(run)
    assert spec.name == "later" and engine.tasks["later"].kind == "generation"
    engine.load(run, "again")
    assert {"later", "again"} <= set(engine.tasks)


def test_classification_is_cut_to_the_trained_max_length_and_says_so(adapters, tmp_path):
    run = run_folder(adapters / "sent", tmp_path / "short", max_length=6)
    engine = Engine.from_folder([run, adapters / "topic"], device="cpu")
    assert engine.max_lengths == {"short": 6, "topic": 128}
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(40))
    rows = engine.classify_rows(
        [
            ("short", long_text),
            ("short", "a good film"),
            ("topic", long_text),
            ("short", " ".join(long_text.split()[:5])),
        ]
    )
    assert [r.truncated for r in rows] == [True, False, False, False]  # 5 words + BOS = 6 tokens: not cut
    # the cut row equals its first tokens alone: what training saw
    first = " ".join(long_text.split()[:5])
    assert rows[0].probabilities == pytest.approx(engine.classify([("short", first)])[0], abs=1e-6)
    assert engine.classify([("short", long_text)])[0] == pytest.approx(rows[0].probabilities, abs=1e-6)


def test_a_bank_may_hold_a_task_named_adapter(adapters, tmp_path):
    """BANK/adapter/ beside other task folders is a task of the bank, not the sign of a run folder."""
    bank = tmp_path / "bank"
    shutil.copytree(adapters / "gen", bank / "adapter")
    shutil.copytree(adapters / "sent", bank / "sent")
    assert set(find_adapters(bank)) == {"adapter", "sent"}
    (bank / "config.yaml").write_text("train:\n  max_length: 7\n")
    run = tmp_path / "run"
    shutil.copytree(adapters / "gen", run / "adapter")
    (run / "checkpoint").mkdir()  # what a run folder holds beside its adapter
    assert find_adapters(run) == {"run": run / "adapter"}


def test_folder_names_become_task_names_as_train_makes_them(adapters, tmp_path):
    """'train --output runs/my.run' names its task 'my-run'; serving the run finds it under that name."""
    bank = tmp_path / "runs"
    run_folder(adapters / "sent", bank / "my.run")
    shutil.copytree(adapters / "topic", bank / "v2.topic")
    assert set(find_adapters(bank)) == {"my-run", "v2-topic"}
    assert set(Engine.from_folder(bank, device="cpu").tasks) == {"my-run", "v2-topic"}
    shutil.copytree(adapters / "gen", bank / "my-run")
    with pytest.raises(ConfigError, match="two tasks are named 'my-run'"):
        find_adapters(bank)
