"""Memorisation (issue 18): the loss-based membership attack's AUC and advantage against hand-computed cases, a tiny
task overtrained on random labels leaking its training rows where members against members does not, the report's
files, and the bad inputs with one line each."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from helpers import WORDS, save_tiny

from multitune.cli import main
from multitune.errors import DataError
from multitune.risks.memorisation import attack_advantage, membership_auc, membership_report


# ---- the statistics ------------------------------------------------------------------------------------------
def test_auc_by_hand_with_ties() -> None:
    # members 1, 2, 3; non-members 2, 4: pairs (l_m < l_n) + half ties:
    # 1: <2, <4 -> 2;  2: =2 (0.5), <4 -> 1.5;  3: >2, <4 -> 1  => 4.5 / 6
    assert membership_auc([1, 2, 3], [2, 4]) == pytest.approx(0.75)
    assert membership_auc([1, 1], [1, 1]) == 0.5  # all ties: no leak
    assert membership_auc([0, 0.1], [5, 6]) == 1.0 and membership_auc([5, 6], [0, 0.1]) == 0.0
    same = [random.Random(3).random() for _ in range(50)]
    assert membership_auc(same, same) == pytest.approx(0.5)  # members against themselves


def test_advantage_by_hand() -> None:
    # threshold 2: TPR 2/3 (1, 2), FPR 1/2 (2); threshold 1: 1/3 - 0; threshold 3: 1 - 1/2 = 0.5 (the largest)
    assert attack_advantage([1, 2, 3], [2, 4]) == pytest.approx(0.5)
    assert attack_advantage([0, 0.1], [5, 6]) == 1.0
    assert attack_advantage([5, 6], [0, 0.1]) == 0.0


def test_report_interval_holds_the_auc() -> None:
    rng = random.Random(0)
    members = [rng.gauss(0, 1) for _ in range(40)]
    non = [rng.gauss(1, 1) for _ in range(40)]
    result = membership_report(members, non, resamples=200, seed=1)
    low, high = result["auc_ci"]
    assert low <= result["auc"] <= high and result["auc"] > 0.6
    assert result["members"] == result["non_members"] == 40
    with pytest.raises(DataError, match="at least one member"):
        membership_auc([], [1.0])


# ---- a tiny overtrained task ---------------------------------------------------------------------------------
def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def overtrained(tmp_path_factory) -> dict[str, Path]:
    """A tiny encoder fully fine-tuned for many epochs on rows of random words with random labels: all it can learn
    is the training rows themselves, so their loss falls and the held-out rows' does not."""
    tmp = tmp_path_factory.mktemp("memo")
    model = save_tiny("bert", tmp / "bert")
    rng = random.Random(0)
    rows = [(" ".join(rng.sample(WORDS, 5)), rng.choice(["pos", "neg"])) for _ in range(120)]
    data = _write(tmp / "random.csv", rows)
    run = tmp / "run"
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(run), "--method", "full",
                 "--epochs", "30", "--learning-rate", "0.003", "--patience", "100", "--batch-size", "8",
                 "--warmup-ratio", "0", "--max-length", "12", "--quiet"])  # fmt: skip
    assert code == 0
    return {"run": run, "data": data, "tmp": tmp}


def test_overtrained_task_leaks_its_training_rows(overtrained, capsys) -> None:
    out = overtrained["tmp"] / "audit"
    flags = ["--attributes", "gender", "--membership", "--resamples", "200"]
    assert (
        main(
            [
                "audit",
                str(overtrained["run"]),
                "--data",
                str(overtrained["data"]),
                "--output",
                str(out),
                *flags,
            ]
        )
        == 0
    )
    report = json.loads((out / "audit.json").read_text())["membership"]
    assert report["auc"] > 0.7 and report["auc_ci"][0] > 0.5, report
    assert report["advantage"] > 0.2 and report["members"] > report["non_members"] > 0
    assert report["mean_loss_members"] < report["mean_loss_non_members"]
    assert "membership (loss attack): AUC" in capsys.readouterr().out
    assert "Memorisation: membership attack" in (out / "audit.html").read_text()


def test_members_against_members_is_no_leak(overtrained) -> None:
    kept = overtrained["run"] / "data" / "replay.jsonl"
    members = overtrained["tmp"] / "members.jsonl"
    members.write_text(kept.read_text())
    out = overtrained["tmp"] / "audit-same"
    assert main(["audit", str(overtrained["run"]), "--data", str(overtrained["data"]), "--output", str(out),
                 "--attributes", "gender", "--membership", "--members", str(members), "--non-members",
                 str(members), "--resamples", "50"]) == 0  # fmt: skip
    report = json.loads((out / "audit.json").read_text())["membership"]
    assert report["auc"] == pytest.approx(0.5) and report["advantage"] == 0.0


def test_membership_without_kept_rows_names_the_fix(overtrained, capsys) -> None:
    adapter = next(p.parent for p in overtrained["run"].rglob("adapter.json"))
    out = overtrained["tmp"] / "audit-adapter"
    code = main(["audit", str(adapter), "--data", str(overtrained["data"]), "--output", str(out), "--attributes",
                 "gender", "--membership", "--resamples", "10"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "give --members FILE" in err and len(err.strip().splitlines()) == 1


# ---- canaries ------------------------------------------------------------------------------------------------
def test_exposure_by_hand() -> None:
    from multitune.risks.canaries import exposure

    assert exposure(0.0, [-1.0] * 10, 1024) == (10.0, 1.0)  # nothing more likely: rank 1, log2 |R|
    value, rank = exposure(0.0, [1.0] * 5 + [-1.0] * 5, 1025)  # half the sample above: rank ~ |R| / 2
    assert rank == 513 and value == pytest.approx(1.0, abs=0.01)


def _generation_csv(path: Path, n: int = 24) -> Path:
    rng = random.Random(2)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        for _ in range(n):
            word = rng.choice(WORDS[:13])
            writer.writerow([f"the movie was {word}", "it is good" if WORDS.index(word) < 7 else "it is bad"])
    return path


def test_canaries_planted_recorded_and_exposed(tmp_path, capsys) -> None:
    from helpers import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"]  # the toy words plus the canaries' own
    vocab = {
        w: i for i, w in enumerate(specials + WORDS + ["my", "secret", "code", "#", *map(str, range(10))])
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]", sep_token="[SEP]")  # fmt: skip
    base = tiny_model("llama")
    base.resize_token_embeddings(len(vocab), mean_resizing=False)
    model = tmp_path / "llama"
    base.save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = _generation_csv(tmp_path / "gen.csv")
    common = ["--model", str(model), "--kind", "generation", "--data", str(data), "--max-length", "16",
              "--method", "full", "--learning-rate", "0.003", "--warmup-ratio", "0", "--patience", "100", "--quiet",
              "--canaries", "2", "--canary-repeats", "5"]  # fmt: skip
    trained, fresh = tmp_path / "trained", tmp_path / "fresh"
    assert main(["train", *common, "--epochs", "25", "--output", str(trained)]) == 0
    assert main(["train", *common, "--epochs", "1", "--max-steps", "1", "--learning-rate", "1e-9",
                 "--output", str(fresh)]) == 0  # fmt: skip
    record = json.loads((trained / "canaries.json").read_text())
    assert record["space"] == 10**6 and record["repeats"] == 5 and len(record["canaries"]) == 2
    assert all(len(c["secret"].split()) == 6 for c in record["canaries"])
    exposures = {}
    for run in (trained, fresh):
        out = tmp_path / f"{run.name}-audit"
        flags = ["--attributes", "gender", "--canaries", "--canary-samples", "300", "--output", str(out)]
        assert main(["audit", str(run), "--data", str(data), *flags]) == 0
        exposures[run.name] = json.loads((out / "audit.json").read_text())["canaries"]
    assert exposures["trained"]["mean_exposure"] > exposures["fresh"]["mean_exposure"] + 3, exposures
    assert exposures["trained"]["max_possible"] == pytest.approx(19.93, abs=0.01)
    assert "canaries: 2 planted x5, exposure mean" in capsys.readouterr().out
    assert "Memorisation: canaries" in (tmp_path / "trained-audit" / "audit.html").read_text()


def test_canaries_on_classification_and_on_a_run_without_them(overtrained, capsys) -> None:
    code = main(["train", "--model", str(overtrained["tmp"] / "bert"), "--data", str(overtrained["data"]),
                 "--output", str(overtrained["tmp"] / "cls-canaries"), "--canaries", "3", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        code == 2
        and "generation task" in err
        and "drop --canaries" in err
        and len(err.strip().splitlines()) == 1
    )
    code = main(["audit", str(overtrained["run"]), "--data", str(overtrained["data"]), "--canaries"])
    err = capsys.readouterr().err
    assert code == 2 and "--canaries" in err and len(err.strip().splitlines()) == 1


# ---- self-consistency ----------------------------------------------------------------------------------------
def test_unigram_f1_and_consistency_by_hand() -> None:
    from multitune.risks.consistency import self_consistency, unigram_f1

    assert unigram_f1("it is good", "it is good") == 1.0 and unigram_f1("good", "bad") == 0.0
    assert unigram_f1("it is good", "it was good") == pytest.approx(2 / 3)  # p = r = 2/3
    assert self_consistency("it is good", ["it is good"] * 4) == 1.0  # identical samples: fully consistent
    assert self_consistency("it is good", ["it is good", "bad"]) == 0.5


def test_consistency_audit_of_a_generation_task(tmp_path, capsys) -> None:
    model = save_tiny("llama", tmp_path / "llama")
    data = _generation_csv(tmp_path / "gen.csv", 12)
    run = tmp_path / "gen"
    assert main(["train", "--model", str(model), "--kind", "generation", "--data", str(data), "--output", str(run),
                 "--epochs", "1", "--max-length", "16", "--quiet"]) == 0  # fmt: skip
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nthe movie was good\nthe movie was bad\nthe food was awful\n")
    out = tmp_path / "audit"
    assert main(["audit", str(run), "--data", str(prompts), "--consistency", "--samples", "3", "--output",
                 str(out)]) == 0  # fmt: skip
    result = json.loads((out / "audit.json").read_text())["consistency"]
    assert result["rows"] == 3 and result["samples"] == 3 and 0.0 <= result["mean_consistency"] <= 1.0
    assert result["mean_token_logp"] < 0 and len(result["least_consistent"]) == 3
    assert all(0.0 <= r["consistency"] <= 1.0 and len(r["samples"]) == 3 for r in result["least_consistent"])
    assert "consistency: 3 prompts" in capsys.readouterr().out
    assert "self-consistency" in (out / "audit.html").read_text()


def test_consistency_on_classification_is_one_line(overtrained, capsys) -> None:
    code = main(["audit", str(overtrained["run"]), "--data", str(overtrained["data"]), "--consistency"])
    err = capsys.readouterr().err
    assert code == 2 and "drop --consistency" in err and len(err.strip().splitlines()) == 1
