"""``multitune update`` / ``versions`` / ``promote`` / ``rollback`` on a tiny encoder (issue 17): versions on
disk, the accuracy matrix and BWT, the gate's exit status, rollback to bit-identical outputs, every strategy,
new labels, and the bad inputs each with one line."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import NEGATIVE, POSITIVE, WORDS, save_tiny

from multitune.cli import main
from multitune.health.update import UpdateConfig, _gate, backward_transfer, points
from multitune.health.versions import current_version, pointer_file, version_numbers
from multitune.storage import output_lock


def write_rows(path: Path, n: int, seed: int, labels: tuple[str, ...] = ("pos", "neg")) -> Path:
    rng = random.Random(seed)
    words = {"pos": POSITIVE, "neg": NEGATIVE, "neu": WORDS[13:18]}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % len(labels)]
            row = rng.sample(words[label], 2) + rng.sample(WORDS[18:], 3)
            rng.shuffle(row)
            writer.writerow([" ".join(row), label])
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny("bert", tmp_path_factory.mktemp("tiny") / "bert"))


def train_run(
    model: str, folder: Path, data: Path, method: str = "lora", extra: tuple[str, ...] = ()
) -> Path:
    code = main(
        ["train", "--model", model, "--method", method, "--data", str(data), "--output", str(folder),
         "--epochs", "2", "--max-length", "16", "--quiet", *extra]
    )  # fmt: skip
    assert code == 0
    return folder


def update(run: Path, data: Path, *flags: str) -> int:
    try:
        return main(["update", str(run), "--data", str(data), "--epochs", "1", "--quiet", *flags])
    except SystemExit as stop:  # the gate's refusal exits 3
        return int(stop.code)


def probabilities(path: Path, texts: list[str]) -> torch.Tensor:
    from multitune.api import load

    return load(path).predict_proba(texts)


TEXTS = ["good great fine", "bad awful sad", "the movie was good"]


def test_train_keeps_the_test_split_and_a_replay_sample(model, tmp_path):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    data = run / "data"
    assert len((data / "test.jsonl").read_text().splitlines()) == 8  # 10% of 80
    assert len((data / "replay.jsonl").read_text().splitlines()) == 64  # all 64 training rows (< 500)
    assert json.loads((data / "source.json").read_text())["examples"] == {
        "train": 64,
        "validation": 8,
        "test": 8,
    }
    other = train_run(model, tmp_path / "quiet", tmp_path / "a.csv", extra=("--no-keep-replay",))
    assert not (other / "data" / "replay.jsonl").exists() and (other / "data" / "test.jsonl").exists()


def test_update_writes_a_version_scores_it_on_every_split_and_rollback_restores_the_bytes(
    model, tmp_path, capsys
):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    before = probabilities(run, TEXTS)
    assert current_version(run) == 1 and version_numbers(run) == [1]
    assert update(run, write_rows(tmp_path / "b.csv", 80, 1), "--promote", "always") == 0
    out = capsys.readouterr().out
    assert (
        "version 2 of" in out and "backward transfer (BWT)" in out and "promoted: version 2 is current" in out
    )
    assert current_version(run) == 2 and pointer_file(run).read_text() == "2\n"
    record = json.loads((run / "versions" / "2" / "version.json").read_text())
    assert set(record["scores"]) == {"1", "2"} and record["parent"] == 1 and record["strategy"] == "replay"
    assert record["examples"]["replayed"] == 4  # 5% of the 64 earlier training rows, rounded up
    first = json.loads((run / "versions" / "1" / "version.json").read_text())
    assert set(first["scores"]) == {"1", "2"}  # version 1 scored on the new data too: the gain is against it
    expected = points("classification", record["scores"]["1"], first["scores"]["1"])
    assert record["bwt"] == pytest.approx(expected)
    assert torch.equal(probabilities(run, TEXTS), probabilities(run / "versions" / "2", TEXTS))
    assert not torch.equal(probabilities(run, TEXTS), before)

    assert main(["versions", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["current"]) for r in rows] == [(1, False), (2, True)]
    assert rows[1]["size_bytes"] > 0 and rows[1]["strategy"] == "replay"

    assert main(["rollback", str(run)]) == 0
    assert "rolled back to version 1 (was 2)" in capsys.readouterr().out
    assert torch.equal(
        probabilities(run, TEXTS), before
    )  # bit-identical: version 1's files were never touched
    assert main(["promote", str(run), "2"]) == 0 and current_version(run) == 2


def test_the_gate_refuses_with_exit_3_and_keeps_the_version(model, tmp_path, capsys):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    assert (
        update(run, write_rows(tmp_path / "b.csv", 80, 1), "--promote", "never", "--strategy", "naive") == 3
    )
    out = capsys.readouterr().out
    assert "not promoted: --promote never; version 1 stays current" in out
    assert f"multitune promote {run} 2" in out
    assert current_version(run) == 1 and version_numbers(run) == [1, 2]


def test_gate_rules():
    upd = UpdateConfig(max_forgetting=1.0)
    assert _gate(upd, -0.5, 2.0)[0] is True
    assert _gate(upd, -1.5, 2.0) == (
        False,
        "it forgot 1.50 points on earlier data (BWT), more than --max-forgetting 1",
    )
    assert _gate(upd, 0.0, 0.0)[0] is False and "did not improve" in _gate(upd, 0.0, 0.0)[1]
    assert _gate(upd, None, 3.0)[0] is False
    matrix = {1: {1: 0.90, 2: 0.5}, 2: {1: 0.80, 2: 0.9}, 3: {1: 0.85, 2: 0.85, 3: 0.9}}
    assert backward_transfer("classification", matrix, 3, [1, 2]) == pytest.approx((-5 - 5) / 2)
    assert points("generation", 11.0, 10.0) == pytest.approx(-10.0)  # a 10% higher perplexity


@pytest.mark.parametrize("strategy", ["ewc", "retrain"])
def test_every_strategy_makes_a_version(model, tmp_path, strategy):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    assert (
        update(run, write_rows(tmp_path / "b.csv", 80, 1), "--strategy", strategy, "--promote", "always") == 0
    )
    record = json.loads((run / "versions" / "2" / "version.json").read_text())
    assert record["strategy"] == strategy and set(record["scores"]) == {"1", "2"}
    if strategy == "retrain":
        assert record["examples"]["trained_on"] == 64 + 64  # every row version 1 trained on, and the new ones


def test_new_labels_need_add_labels_and_then_grow_the_head(model, tmp_path, capsys):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    new = write_rows(tmp_path / "c.csv", 90, 2, ("pos", "neg", "neu"))
    assert update(run, new) == 2
    err = capsys.readouterr().err
    assert "labels the task does not know: 'neu'; pass --add-labels" in err and len(err.splitlines()) == 1
    assert version_numbers(run) == [1]  # nothing written
    assert update(run, new, "--add-labels", "--promote", "always") == 0
    from multitune.api import load

    task = load(run)
    assert task.labels == ["neg", "pos", "neu"] or task.labels[-1] == "neu"
    assert json.loads((run / "versions" / "2" / "version.json").read_text())["labels_added"] == ["neu"]


def test_rehearsal_keeps_every_earlier_label_and_its_share():
    from multitune.data import Example
    from multitune.health import kept

    pool = [Example(text=f"a{i}", label="a") for i in range(90)] + [
        Example(text=f"r{i}", label=f"rare{i % 3}") for i in range(12)
    ]
    share = kept.sample_by_label(pool, 10, seed=0)  # each label its share of 10, rounded up
    assert sorted(ex.label for ex in share).count("a") == 9 and {ex.label for ex in share} == {
        "a",
        "rare0",
        "rare1",
        "rare2",
    }
    floored = kept.sample_by_label(
        pool, 10, seed=0, floor=5
    )  # at least 5 of each, as far as a label has them
    counts = {label: sum(ex.label == label for ex in floored) for label in ("a", "rare0", "rare1", "rare2")}
    assert counts == {"a": 9, "rare0": 4, "rare1": 4, "rare2": 4}
    assert floored == [ex for ex in pool if ex in floored]  # the pool's order
    assert kept.sample_by_label(pool, 10, seed=0, floor=5) == floored  # seeded


def test_a_class_incremental_update_rehearses_every_earlier_label(model, tmp_path):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    new = write_rows(tmp_path / "c.csv", 60, 2, ("neu",))
    assert (
        update(run, new, "--add-labels", "--replay", "2", "--replay-per-label", "6", "--promote", "always")
        == 0
    )
    record = json.loads((run / "versions" / "2" / "version.json").read_text())
    assert record["examples"]["replayed"] == 12  # 6 of pos and of neg, where a share of 2 rows gave 1 each


def test_bad_inputs_are_one_line(model, tmp_path, capsys):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    b = write_rows(tmp_path / "b.csv", 80, 1)
    cases = [
        (["promote", str(run), "7"], "has no version 7; its versions are 1"),
        (["rollback", str(run)], "is its first: there is nothing to roll back to"),
        (["update", str(run), "--data", str(b), "--strategy", "fancy"], "--strategy must be one of"),
        (["update", str(run), "--data", str(b), "--replay", "0"], "--replay must be a share"),
        (["update", str(run), "--data", str(b), "--replay-per-label", "-1"], "--replay-per-label must be"),
        (["update", str(tmp_path / "nowhere"), "--data", str(b)], "does not exist"),
        (["update", str(run), "--data", str(b), "--text-column", "review"], "review"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    with output_lock(run, "multitune update"):  # another update of the same task is running
        assert main(["update", str(run), "--data", str(b)]) == 2
        assert "is in use by" in capsys.readouterr().err
    assert version_numbers(run) == [1] and current_version(run) == 1


def test_no_kept_rows_names_naive_and_replay_data(model, tmp_path, capsys):
    a = write_rows(tmp_path / "a.csv", 80, 0)
    run = train_run(model, tmp_path / "run", a, extra=("--no-keep-replay",))
    a.unlink()  # the data file is gone too: nothing to rehearse
    b = write_rows(tmp_path / "b.csv", 80, 1)
    assert update(run, b) == 2
    err = capsys.readouterr().err
    assert "--replay-data FILE" in err and "--strategy naive" in err
    assert update(run, b, "--replay-data", str(b), "--promote", "always") == 0  # rows given instead


def test_a_bank_task_updates_alone_and_its_neighbours_stay_bit_identical(model, tmp_path):
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base
    from multitune.serve.engine import Engine
    from multitune.storage import save_adapter

    bank = MultiTaskModel(load_base(model))
    for name in ("one", "two"):
        bank.add_task(name, "classification", "lora", None, ["neg", "pos"])
        save_adapter(bank, name, tmp_path / "bank" / name)
    neighbour = {p.name: p.read_bytes() for p in (tmp_path / "bank" / "two").iterdir()}
    served = Engine.from_folder(tmp_path / "bank").classify([("two", t) for t in TEXTS])
    # a bank task kept no test split: forgetting cannot be measured, so only --promote always promotes it
    assert (
        update(tmp_path / "bank" / "one", write_rows(tmp_path / "b.csv", 80, 1), "--strategy", "naive") == 3
    )
    assert (
        update(tmp_path / "bank" / "one", tmp_path / "b.csv", "--strategy", "naive", "--promote", "always")
        == 0
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "bank" / "two").iterdir()} == neighbour
    engine = Engine.from_folder(tmp_path / "bank")
    assert engine.classify([("two", t) for t in TEXTS]) == served
    assert Path(engine.sources["one"]).resolve() in {
        (tmp_path / "bank" / "one").resolve(),
        (tmp_path / "bank" / "one" / "versions" / "3").resolve(),
    }


def test_a_fully_fine_tuned_version_is_a_whole_model(model, tmp_path, capsys):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0), method="full")
    assert update(run, write_rows(tmp_path / "b.csv", 80, 1), "--promote", "always") == 0
    capsys.readouterr()
    main(["versions", str(run), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["size_bytes"] > 0.5 * rows[0]["size_bytes"] > 0
    assert rows[1]["size_bytes"] > 50_000  # the tiny model's weights, not an adapter's


def test_a_generation_update_measures_general_text_perplexity(tmp_path, capsys):
    from helpers import toy_generation

    model = str(save_tiny("llama", tmp_path / "llama"))
    for name, seed in (("a", 0), ("b", 1)):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "response"])
            writer.writerows((ex.text, ex.response) for ex in toy_generation(40, seed))
    (tmp_path / "general.txt").write_text("the movie was good\n\nit is fine and great\n")
    code = main(
        ["train", "--model", model, "--kind", "generation", "--method", "lora", "--data", str(tmp_path / "a.csv"),
         "--output", str(tmp_path / "run"), "--epochs", "1", "--max-length", "24", "--quiet"]
    )  # fmt: skip
    assert code == 0
    general = str(tmp_path / "general.txt")
    assert update(tmp_path / "run", tmp_path / "b.csv", "--general-data", general, "--promote", "always") == 0
    out = capsys.readouterr().out
    assert "perplexity of each version" in out and "general-text perplexity:" in out
    record = json.loads((tmp_path / "run" / "versions" / "2" / "version.json").read_text())
    assert record["metric"] == "perplexity" and record["general_perplexity"]["after"] > 1


def test_feedback_of_a_served_task_is_new_data(model, tmp_path, capsys):
    from multitune.health.store import STORE_FILE, FeedbackStore

    run = train_run(model, tmp_path / "bank" / "sent", write_rows(tmp_path / "a.csv", 80, 0))
    store = FeedbackStore.open(tmp_path / "bank" / STORE_FILE, log_requests=True)
    rng = random.Random(3)
    for i in range(60):  # answers a server gave, then the users' labels for them
        label = ("pos", "neg")[i % 2]
        text = " ".join(rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(WORDS[18:], 2))
        store.record(f"id{i}", "sent", "classification", "pos", {"pos": 0.6, "neg": 0.4}, text)
        store.feedback(f"id{i}", label=label)
    store.close()
    assert update(run, Path(f"feedback:{tmp_path / 'bank'}"), "--task", "sent", "--promote", "always") == 0
    record = json.loads((run / "versions" / "2" / "version.json").read_text())
    kept_file = Path(record["data"]["data"])
    assert kept_file.is_file() and kept_file.is_relative_to(run)  # kept with the task: retrain reads it again
    assert record["examples"]["train"] == 48  # 80% of the 60 labelled answers
    assert update(run, Path(f"feedback:{tmp_path / 'bank'}"), "--task", "nobody") == 2
    assert "no feedback for task 'nobody'" in capsys.readouterr().err


def test_ewc_with_new_labels_anchors_the_old_rows_only(model, tmp_path):
    run = train_run(model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0))
    new = write_rows(tmp_path / "c.csv", 90, 2, ("pos", "neg", "neu"))
    code = update(run, new, "--strategy", "ewc", "--add-labels", "--promote", "always", "--epochs", "3")
    assert code == 0
    from safetensors.torch import load_file

    before = load_file(str(run / "adapter" / "adapter.safetensors"))
    after = load_file(str(run / "versions" / "2" / "adapter.safetensors"))
    assert after["head.weight"].shape[0] == before["head.weight"].shape[0] + 1
    record = json.loads((run / "versions" / "2" / "version.json").read_text())
    assert record["labels_added"] == ["neu"] and record["strategy"] == "ewc"


@pytest.mark.parametrize("strategy", ["replay", "retrain"])
def test_a_stacked_task_updates_on_the_component_it_stands_on(model, tmp_path, strategy):
    under = train_run(model, tmp_path / "under", write_rows(tmp_path / "u.csv", 40, 3), "ia3")
    run = train_run(
        model, tmp_path / "run", write_rows(tmp_path / "a.csv", 80, 0), extra=("--stack-on", str(under))
    )
    assert (
        update(run, write_rows(tmp_path / "b.csv", 80, 1), "--strategy", strategy, "--promote", "always") == 0
    )
    meta = json.loads((run / "versions" / "2" / "adapter.json").read_text())
    assert meta["stack_on"]["task"] == "under"
    assert (run / "versions" / "2" / meta["stack_on"]["relative"]).resolve() == (under / "adapter").resolve()
    task = __import__("multitune").load(run)  # the current version, with its component
    assert task.bank.slots == ["under", "run"]
    assert len(task.predict(TEXTS)) == len(TEXTS)
