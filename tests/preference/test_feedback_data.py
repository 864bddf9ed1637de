"""`--data feedback:BANK --task T`: a served task's ratings and corrections train KTO, DPO and a reward model
straight from the server's store, starting from the adapter the server serves; bad sources are one line."""

from __future__ import annotations

import json

import pytest
from test_preference import TRAIN_FLAGS, toy_pairs, write_jsonl

from multitune.cli import main
from multitune.health.store import STORE_FILE, FeedbackStore


@pytest.fixture(scope="module")
def served(llama_dir, tmp_path_factory):
    """BANK/writer: a generation task trained with KTO on a file, and BANK/monitor.sqlite: 40 of its answers
    rated by people (good: the positive response), every fourth bad one corrected."""
    bank = tmp_path_factory.mktemp("bank")
    pairs = toy_pairs(48, 3)
    rows = [{"prompt": p.prompt, "completion": p.chosen if i % 2 else p.rejected, "label": bool(i % 2)}
            for i, p in enumerate(pairs)]  # fmt: skip
    seed = write_jsonl(bank.parent / "seed.jsonl", rows)
    argv = ["kto", "--data", seed, "--model", str(llama_dir), "--lora-rank", "4", "--output", str(bank / "writer"),
            "--quiet", *TRAIN_FLAGS, "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    store = FeedbackStore.open(bank / STORE_FILE, log_requests=True)
    corrections = 0
    for i, pair in enumerate(toy_pairs(40, 4)):
        good = i % 2 == 0
        store.record(
            f"g{i}", "writer", "generation", pair.chosen if good else pair.rejected, None, pair.prompt
        )
        if not good and i % 4 == 1:
            store.feedback(f"g{i}", rating=0.0, correction=pair.chosen)
            corrections += 1
        else:
            store.feedback(f"g{i}", rating=1.0 if good else 0.0)
    store.record("x", "writer", "generation", "no feedback on this one", None, "a prompt")
    store.close()
    return bank, llama_dir, corrections


def test_kto_and_dpo_train_on_the_served_feedback_from_the_served_adapter(served, tmp_path, capsys) -> None:
    bank, model, corrections = served
    common = ["--model", str(model), "--data", f"feedback:{bank}", "--task", "writer", "--quiet", *TRAIN_FLAGS,
              "--epochs", "1"]  # fmt: skip
    assert main(["kto", *common, "--output", str(tmp_path / "kto")]) == 0
    printed = capsys.readouterr().out
    assert f"starting from the served task 'writer' ({bank / 'writer' / 'adapter'})" in printed
    kto = json.loads((tmp_path / "kto" / "result.json").read_text())
    # 40 rated answers, plus each correction as a desirable row; the answer without feedback is not data
    assert kto["rows"]["train"] + kto["rows"]["validation"] == 40 + corrections
    assert kto["rows"]["desirable"] > 0 and kto["rows"]["undesirable"] > 0
    assert kto["task"] == "writer" and (tmp_path / "kto" / "report.html").is_file()
    adapter = json.loads((tmp_path / "kto" / "adapter" / "adapter.json").read_text())
    assert adapter["task"]["name"] == "writer" and adapter["task"]["method"] == "lora"

    assert main(["dpo", *common, "--output", str(tmp_path / "dpo"), "--validation-ratio", "0.25"]) == 0
    dpo = json.loads((tmp_path / "dpo" / "result.json").read_text())
    assert dpo["pairs"]["train"] + dpo["pairs"]["validation"] == corrections  # the corrections are the pairs
    assert "starting from the served task" in capsys.readouterr().out
    assert dpo["init_adapter"] == str(bank / "writer" / "adapter")  # recorded, and config.yaml reruns it
    assert f"init_adapter: {bank / 'writer' / 'adapter'}" in (tmp_path / "dpo" / "config.yaml").read_text()
    # an explicit --init-adapter wins over the served one; a reward model needs none
    assert main(["reward", *common, "--output", str(tmp_path / "rm"), "--validation-ratio", "0.25"]) == 0
    held = max(1, round(corrections * 0.25))
    assert json.loads((tmp_path / "rm" / "result.json").read_text())["pairs"]["train"] == corrections - held
    assert "starting from" not in capsys.readouterr().out


def test_bad_feedback_sources_are_one_line_and_write_nothing(served, tmp_path, capsys) -> None:
    bank, model, _ = served
    ratings_only = tmp_path / "ratings.sqlite"
    store = FeedbackStore.open(ratings_only, log_requests=True)
    for rid, rating in (("a", 1.0), ("c", 0.0), ("d", 1.0)):
        store.record(rid, "writer", "generation", f"answer {rid}", None, f"prompt {rid}")
        store.feedback(rid, rating=rating)
    store.record("b", "sent", "classification", "pos", {"pos": 1.0}, "a text")
    store.feedback("b", label="pos")
    store.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, task, expected in (
        (f"feedback:{bank}", None, "reads the feedback of one served task; pass --task"),
        ("feedback:", "writer", "names no store; give feedback:BANK"),
        (f"feedback:{tmp_path / 'nowhere'}", "writer", "no such folder or file"),
        (f"feedback:{empty}", "writer", "no server has recorded feedback"),
        (f"feedback:{bank}", "other", "holds no feedback for task 'other' (tasks with answers: writer)"),
        (f"feedback:{ratings_only}", "sent", "is a classification task; preference training reads a generation"),
        (f"feedback:{ratings_only}", "writer", "no correction, so no pair to train on; train KTO on the ratings: "
                                               f"multitune kto --data feedback:{ratings_only} --task writer"),
    ):  # fmt: skip
        out = tmp_path / "run"
        argv = ["dpo", "--model", str(model), "--data", data, "--output", str(out), *TRAIN_FLAGS]
        assert main([*argv, *(["--task", task] if task else [])]) != 0
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
        assert not out.exists() or not any(out.iterdir())
    argv = ["dpo", "--model", str(model), "--data", f"feedback:{empty}", "--monitor-db", str(ratings_only),
            "--task", "writer", "--output", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) != 0  # the advice names the --monitor-db it read, so that it works as printed
    assert f"--task writer --monitor-db {ratings_only}" in capsys.readouterr().err
    assert main([*argv[:5], "--monitor-db", str(tmp_path / "typo.sqlite"), *argv[7:]]) != 0
    assert "no such folder or file" in capsys.readouterr().err and not (tmp_path / "typo.sqlite").exists()
    # the advice works: KTO takes the ratings the DPO run could not pair (here from the --monitor-db servers
    # shared, as `update --data feedback:BANK --monitor-db` reads it)
    assert main(["kto", "--model", str(model), "--data", f"feedback:{empty}", "--monitor-db", str(ratings_only),
                 "--task", "writer",
                 "--output", str(tmp_path / "k"), "--quiet", *TRAIN_FLAGS, "--epochs", "1"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "k" / "result.json").read_text())["rows"]["train"] == 2
