"""The CLI end to end on tiny saved models: flags and config files as a user writes them, the advice of
error messages followed as printed, run folders named and described as they are, import-peft and ensembles."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from helpers import toy_sentiment

from multitune.cli import main


def _write_csv(path, examples, hole: int | None = None) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([("" if i == hole else ex.text, ex.label) for i, ex in enumerate(examples)])
    return str(path)


@pytest.fixture
def reviews(tmp_path) -> str:
    return _write_csv(tmp_path / "reviews.csv", toy_sentiment(80))


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_the_drop_empty_advice_works_as_printed_in_train_and_eval(bert_dir, tmp_path, capsys) -> None:
    data = _write_csv(tmp_path / "holes.csv", toy_sentiment(80), hole=5)
    run = tmp_path / "runs" / "subj"
    argv = [
        "train",
        "--model",
        str(bert_dir),
        "--data",
        data,
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--output",
        str(run),
        "--max-steps",
        "1",
        "--quiet",
    ]
    assert main(argv) == 2
    assert "pass --drop-empty" in _err(capsys) and not run.exists()
    assert main([*argv, "--drop-empty"]) == 0
    printed = capsys.readouterr().out
    assert "1 step," in printed and "1 steps" not in printed
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    assert (
        meta["task"]["name"] == "subj"
    )  # named after its folder: two runs copied into one bank do not collide
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["drop_empty"] is True

    argv = ["eval", str(run), "--data", data, "--text-column", "review", "--label-column", "stars"]
    assert main(argv) == 2
    assert "pass --drop-empty" in _err(capsys)
    assert main([*argv, "--drop-empty"]) == 0
    assert "79 examples" in capsys.readouterr().out


def test_a_flat_config_file_trains_and_the_written_config_repeats_the_run(
    bert_dir, reviews, tmp_path, capsys
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(bert_dir),
                "data": reviews,
                "text_column": "review",
                "label_column": "stars",
                "max_steps": 3,
                "batch_size": 8,
                "lora_rank": 2,
                "lora_rslora": True,
                "quiet": True,
            }
        )
    )
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--config", str(config), "--output", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.yaml"), "--output", str(second), "--quiet"]) == 0
    a, b = (yaml.safe_load((run / "config.yaml").read_text()) for run in (first, second))
    assert (
        a["lora"]
        == b["lora"]
        == {
            "rank": 2,
            "alpha": 16.0,
            "dropout": 0.05,
            "target_modules": None,
            "rslora": True,
            "use_dora": False,
        }
    )
    assert a["train"] == b["train"] and a["train"]["max_steps"] == 3 and a["data"] == b["data"]
    assert (
        a["task"] == b["task"] == "first"
    )  # the file records the name the first run resolved, which then holds
    results = [json.loads((run / "result.json").read_text()) for run in (first, second)]
    assert results[0]["test"] == results[1]["test"] and results[0]["steps"] == 3

    config.write_text("data: my.csv\nmax_steps: 3\nlora_rnak: 4\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "lora_rnak (did you mean lora_rank?)" in _err(capsys)


def test_train_multi_takes_flat_keys_and_prints_its_folders(bert_dir, reviews, tmp_path, capsys) -> None:
    config = tmp_path / "multi.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(bert_dir),
                "epochs": 1,
                "batch_size": 16,
                "tasks": [
                    {
                        "name": "a",
                        "method": "lora",
                        "data": reviews,
                        "text_column": "review",
                        "label_column": "stars",
                        "lora_rank": 2,
                    },
                    {
                        "name": "b",
                        "method": "ia3",
                        "data": {"data": reviews, "text_column": "review", "label_column": "stars"},
                    },
                ],
            }
        )
    )
    out = tmp_path / "bank"
    assert main(["train-multi", "--config", str(config), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"adapters: {out / 'a'}, {out / 'b'}" in printed and "TASK" not in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["tasks"][0]["lora"]["rank"] == 2

    config.write_text(
        yaml.safe_dump(
            {
                "model": str(bert_dir),
                "epoch": 1,
                "tasks": [{"name": "a", "data": reviews, "lora_rnak": 2, "lerning_rate": 0.1}],
            }
        )
    )
    assert main(["train-multi", "--config", str(config), "--output", str(tmp_path / "x")]) == 2
    assert "epoch (did you mean epochs?)" in _err(capsys)
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(bert_dir),
                "tasks": [{"name": "a", "data": reviews, "lora_rnak": 2, "lerning_rate": 0.1}],
            }
        )
    )
    assert main(["train-multi", "--config", str(config), "--output", str(tmp_path / "x")]) == 2
    message = _err(capsys)
    assert (
        "lora_rnak (did you mean lora_rank?)" in message
        and "lerning_rate (did you mean learning_rate?)" in message
    )


def test_import_peft_of_a_classification_export_keeps_its_kind_labels_and_head(
    bert_dir, reviews, tmp_path, capsys
) -> None:
    import multitune

    run = tmp_path / "cls"
    assert (
        main(
            [
                "train",
                "--model",
                str(bert_dir),
                "--data",
                reviews,
                "--text-column",
                "review",
                "--label-column",
                "stars",
                "--output",
                str(run),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--learning-rate",
                "0.01",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["export-peft", str(run), "--output", str(tmp_path / "peft")]) == 0
    assert (
        main(["import-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "back"), "--task", "back"])
        == 0
    )
    assert "lora classification task 'back'" in capsys.readouterr().out
    texts = [ex.text for ex in toy_sentiment(12, seed=4)]
    original, back = multitune.load(run), multitune.load(tmp_path / "back")
    assert back.labels == original.labels and back.predict(texts) == original.predict(texts)

    # a PEFT folder without multitune's files: the kind from the base (an encoder), the labels must be given
    for extra in ("multitune_task.json", "multitune_head.safetensors"):
        (tmp_path / "peft" / extra).unlink()
    assert main(["import-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "bare")]) == 2
    assert "pass --labels" in _err(capsys) and not (tmp_path / "bare").exists()
    assert (
        main(
            ["import-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "bare"), "--labels", "neg,pos"]
        )
        == 0
    )
    assert "head is untrained" in capsys.readouterr().out
    assert multitune.load(tmp_path / "bare").labels == ["neg", "pos"]
    assert (
        main(["import-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "g"), "--kind", "generation"])
        == 2
    )
    assert "generation needs a causal LM" in _err(capsys)  # asked for explicitly: the base says why not
    (tmp_path / "peft" / "adapter_config.json").write_text("{not json")
    assert main(["import-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "y")]) == 2
    assert "not valid JSON" in _err(capsys)


def test_peft_task_type_tells_the_kind(llama_dir, tmp_path) -> None:
    from helpers import perturb

    from multitune.bank import MultiTaskModel
    from multitune.interop.peft import export_peft, import_peft, peft_kind
    from multitune.models import load_base

    bank = MultiTaskModel(load_base(str(llama_dir), device="cpu"))
    bank.add_task("g", "generation", "lora")
    perturb(bank, "g", 1)
    export_peft(bank, "g", tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    assert peft_kind(bank, tmp_path / "p") == "generation"  # task_type null, a decoder: generation
    for task_type, kind in (
        ("CAUSAL_LM", "generation"),
        ("SEQ_2_SEQ_LM", "generation"),
        ("SEQ_CLS", "classification"),
    ):
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "task_type": task_type}))
        assert peft_kind(bank, tmp_path / "p") == kind
    spec = import_peft(bank, tmp_path / "p", "c", labels=["x", "y"])  # SEQ_CLS: a classification task
    assert spec.kind == "classification" and spec.labels == ["x", "y"]


def test_a_prompt_ensemble_from_the_cli_votes_in_eval_and_predict(
    bert_dir, reviews, tmp_path, capsys
) -> None:
    run = tmp_path / "ens"
    assert (
        main(
            [
                "ensemble",
                "--model",
                str(bert_dir),
                "--data",
                reviews,
                "--text-column",
                "review",
                "--label-column",
                "stars",
                "--members",
                "3",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--learning-rate",
                "0.05",
                "--prompt-num-virtual-tokens",
                "4",
                "--output",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 members" in printed and "majority vote accuracy" in printed
    result = json.loads((run / "result.json").read_text())
    assert result["members"] == ["ens-e0", "ens-e1", "ens-e2"]
    assert sorted(p.name for p in run.iterdir()) == [
        "config.yaml",
        "ensemble.json",
        "members",
        "metrics.jsonl",
        "result.json",
    ]
    logged = {json.loads(line)["member"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert logged == set(result["members"])

    assert main(["eval", str(run), "--json", str(tmp_path / "m.json")]) == 0
    assert "majority vote of 3 members" in capsys.readouterr().out
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert set(scores["members"]) == set(result["members"])

    new = tmp_path / "new.csv"
    new.write_text("review\n" + "\n".join(ex.text for ex in toy_sentiment(6, seed=9)) + "\n")
    assert main(["predict", str(run), "--input", str(new), "--output", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == 6 and all(r["prediction"] in ("neg", "pos") for r in rows)
    # three members, two labels: the winner has two or three votes
    assert all(min(abs(float(r["agreement"]) - share) for share in (2 / 3, 1.0)) < 1e-5 for r in rows)

    from multitune.training.ensemble import ensemble_predict, load_ensemble

    bank, members, max_length = load_ensemble(run)
    assert [r["prediction"] for r in rows] == ensemble_predict(
        bank, members, [ex for ex in toy_sentiment(6, seed=9)], max_length
    )
    assert (
        main(
            [
                "ensemble",
                "--config",
                str(run / "config.yaml"),
                "--members",
                "0",
                "--output",
                str(tmp_path / "again"),
            ]
        )
        == 2
    )
    assert "at least 1 member" in _err(capsys)
