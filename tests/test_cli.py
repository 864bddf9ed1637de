"""The CLI end to end on tiny saved models: train -> eval -> predict, config files, and every bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from helpers import toy_generation, toy_sentiment

from multitune.cli import main


def _write_csv(path, examples) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([(ex.text, ex.label) for ex in examples])
    return str(path)


@pytest.fixture
def sentiment_csv(tmp_path) -> str:
    return _write_csv(tmp_path / "reviews.csv", toy_sentiment(80))


def _fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI, expect exit 2 and one error line containing ``expected``; return the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in expected:
        assert part in err[0], err[0]
    assert "Traceback" not in err[0]
    return err[0]


def _train_args(model, data, out, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--data",
        data,
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--output",
        str(out),
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--learning-rate",
        "0.01",
        "--quiet",
        *extra,
    ]


def test_train_eval_predict_round_trip(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(_train_args(bert_dir, sentiment_csv, run, "--lora-rank", "4")) == 0
    out = capsys.readouterr().out
    assert "test (8 examples)" in out and "accuracy" in out
    result = json.loads((run / "result.json").read_text())
    assert result["test"]["accuracy"] >= 0.75
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["rank"] == 4
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert (run / "metrics.jsonl").read_text().count("\n") >= 1

    assert main(["eval", str(run), "--json", str(tmp_path / "m.json")]) == 0
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["accuracy"] == pytest.approx(result["test"]["accuracy"])

    unlabelled = tmp_path / "new.jsonl"
    unlabelled.write_text("".join(json.dumps({"review": ex.text}) + "\n" for ex in toy_sentiment(10, seed=3)))
    assert (
        main(
            [
                "predict",
                str(run),
                "--input",
                str(unlabelled),
                "--output",
                str(tmp_path / "p.csv"),
                "--text-column",
                "review",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == 10 and all(r["prediction"] in ("neg", "pos") for r in rows)

    import multitune.api

    task = multitune.api.load(run)
    assert task.predict([r["review"] for r in rows]) == [r["prediction"] for r in rows]


def test_config_file_with_flag_overrides(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(bert_dir),
                "method": "lora",
                "task": "reviews",
                "data": {"data": sentiment_csv, "text_column": "review", "label_column": "stars"},
                "train": {"epochs": 1, "batch_size": 16},
                "lora": {"rank": 2},
            }
        )
    )
    assert (
        main(
            ["train", "--config", str(config), "--output", str(tmp_path / "r"), "--lora-rank", "3", "--quiet"]
        )
        == 0
    )
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["task"] == "reviews" and saved["lora"]["rank"] == 3 and saved["train"]["batch_size"] == 16


def test_generation_train_and_predict(llama_dir, tmp_path, capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": ex.text, "output": ex.response}) + "\n" for ex in toy_generation(40)
        )
    )
    run = tmp_path / "gen"
    assert (
        main(
            [
                "train",
                "--model",
                str(llama_dir),
                "--kind",
                "generation",
                "--data",
                str(data),
                "--output",
                str(run),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--max-new-tokens",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    test = json.loads((run / "result.json").read_text())["test"]
    assert {"loss", "perplexity", "exact_match", "rouge_l"} <= set(test)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nthe movie was good\nthe film was bad\n")
    assert (
        main(
            [
                "predict",
                str(run),
                "--input",
                str(prompts),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["the movie was good", "the film was bad"]
    assert all(isinstance(x["prediction"], str) for x in lines)


def test_full_fine_tuning_from_the_cli(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    run = tmp_path / "full"
    assert (
        main(
            _train_args(
                bert_dir,
                sentiment_csv,
                run,
                "--method",
                "full",
                "--full-freeze-layers",
                "1",
                "--learning-rate",
                "0.001",
                "--epochs",
                "1",
            )
        )
        == 0
    )
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    assert meta["task"]["method"] == "full" and meta["task"]["config"] == {"freeze_layers": 1}


def test_help_lists_every_setting(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--lora-rank",
        "--lora-rslora",
        "--lora-target-modules",
        "--full-freeze-layers",
        "--epochs",
        "--patience",
        "--grad-accum",
        "--scheduler",
        "--text-column",
        "--split",
        "--resume",
        "--config",
    ):
        assert flag in text


# ---- bad inputs: one line, exit 2, nothing saved is lost ----------------------------------------------------
def test_missing_data_file(bert_dir, tmp_path, capsys) -> None:
    _fails(capsys, _train_args(bert_dir, str(tmp_path / "nope.csv"), tmp_path / "r"), "nope.csv")


def test_missing_column_lists_the_columns_found(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    argv = _train_args(bert_dir, sentiment_csv, tmp_path / "r")
    argv[argv.index("review")] = "text"
    _fails(capsys, argv, "column 'text' not found", "columns found: review, stars", "--text-column")


def test_empty_file(bert_dir, tmp_path, capsys) -> None:
    (tmp_path / "e.csv").write_text("")
    _fails(capsys, _train_args(bert_dir, str(tmp_path / "e.csv"), tmp_path / "r"), "empty")


def test_undecodable_bytes(bert_dir, tmp_path, capsys) -> None:
    (tmp_path / "b.csv").write_bytes(b"review,stars\ngood \xff\xfe film,pos\n")
    _fails(capsys, _train_args(bert_dir, str(tmp_path / "b.csv"), tmp_path / "r"), "not valid UTF-8")


def test_unseen_labels_in_a_given_test_file(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    test = tmp_path / "test.csv"
    test.write_text("review,stars\ngood film,pos\nso so,meh\n")
    _fails(capsys, _train_args(bert_dir, sentiment_csv, tmp_path / "r", "--test-data", str(test)), "meh")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("someorg/some-model", "never downloads from the hub"),
        ("/no/such/folder", "not found"),
    ],
)
def test_unusable_models(model, expected, sentiment_csv, tmp_path, capsys) -> None:
    _fails(capsys, _train_args(model, sentiment_csv, tmp_path / "r"), expected)


def test_unsupported_architecture(tmp_path, sentiment_csv, capsys) -> None:
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    _fails(capsys, _train_args(folder, sentiment_csv, tmp_path / "r"), "cannot read the model config")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "magic"], "unknown method 'magic'"),
        (["--lora-rank", "0"], "rank must be >= 1"),
        (
            ["--epochs", "0", "--batch-size", "0"],
            "epochs must be >= 1 (got 0); fix --epochs; batch_size must be >= 1",
        ),
        (["--split", "0.5,0.1"], "split must be three"),
        (["--lora-target-modules", "qkv"], "target modules qkv not found"),
    ],
)
def test_bad_settings(bert_dir, sentiment_csv, tmp_path, capsys, extra, expected) -> None:
    _fails(capsys, _train_args(bert_dir, sentiment_csv, tmp_path / "r", *extra), expected)


def test_generation_on_an_encoder_is_refused(bert_dir, tmp_path, capsys) -> None:
    data = tmp_path / "g.jsonl"
    data.write_text(
        json.dumps({"prompt": "the film", "response": "good"})
        + "\n"
        + json.dumps({"prompt": "a movie", "response": "bad"})
        + "\n"
    )
    _fails(
        capsys,
        [
            "train",
            "--model",
            str(bert_dir),
            "--kind",
            "generation",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "r"),
        ],
        "generation needs a causal LM or a seq2seq model",
    )


def test_bad_config_files(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    _fails(capsys, ["train", "--config", str(tmp_path / "bad.yaml")], "not valid YAML")
    (tmp_path / "typo.yaml").write_text("train:\n  epoch: 3\n")
    _fails(capsys, ["train", "--config", str(tmp_path / "typo.yaml")], "unknown setting(s) epoch")


def test_an_existing_run_is_not_overwritten(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    # not a run folder: the advice is another --output, never --resume (which would write a run into it)
    _fails(
        capsys,
        _train_args(bert_dir, sentiment_csv, run),
        "already exists",
        "other files (keep.txt)",
        "choose another --output",
    )
    _fails(capsys, _train_args(bert_dir, sentiment_csv, run, "--resume"), "choose another --output")
    assert (run / "keep.txt").read_text() == "precious"


def test_predict_errors_keep_an_existing_output(bert_dir, sentiment_csv, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(_train_args(bert_dir, sentiment_csv, run, "--epochs", "1")) == 0
    capsys.readouterr()
    output = tmp_path / "out.csv"
    output.write_text("old predictions\n")
    (tmp_path / "in.csv").write_text("body\nhello\n")
    _fails(
        capsys,
        ["predict", str(run), "--input", str(tmp_path / "in.csv"), "--output", str(output)],
        "no text column found",
        "columns found: body",
    )
    assert output.read_text() == "old predictions\n"
    _fails(capsys, ["eval", str(tmp_path / "missing-run")], "does not exist")
    _fails(capsys, ["eval", str(tmp_path)], "holds no trained adapter")


def test_a_real_process_prints_no_traceback(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "multitune",
            "train",
            "--data",
            str(tmp_path / "x.csv"),
            "--model",
            "someorg/model",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


def test_export_to_peft_and_import_back_keep_the_outputs(llama_dir, tmp_path, capsys) -> None:
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    import multitune

    data = tmp_path / "gen.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": ex.text, "response": ex.response}) + "\n" for ex in toy_generation(24))
    )
    assert (
        main(
            [
                "train",
                "--model",
                str(llama_dir),
                "--data",
                str(data),
                "--kind",
                "generation",
                "--method",
                "prefix",
                "--prefix-num-virtual-tokens",
                "3",
                "--output",
                str(tmp_path / "run"),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["export-peft", str(tmp_path / "run"), "--output", str(tmp_path / "peft")]) == 0
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "peft"
    )
    assert (
        main(["import-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "back"), "--task", "g"]) == 0
    )
    capsys.readouterr()
    task = multitune.load(tmp_path / "back")
    ids = task.bank.base.tokenizer(["good movie"], return_tensors="pt").input_ids
    rows = task.bank.task_ids("g", 1)
    with torch.no_grad(), task.bank.routed(rows):
        inputs, _ = task.bank.model_inputs(ids, torch.ones_like(ids), rows)
        ours = task.bank.base.model(**inputs).logits
        theirs = reference.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    _fails(
        capsys, ["import-peft", str(tmp_path), "--output", str(tmp_path / "x")], "not a PEFT adapter folder"
    )
    _fails(
        capsys, ["export-peft", str(tmp_path / "missing"), "--output", str(tmp_path / "y")], "does not exist"
    )
