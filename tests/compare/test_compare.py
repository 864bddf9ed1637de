"""``multitune compare`` on a tiny saved encoder: search, final runs, results, bank, report, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import toy_sentiment

from multitune.cli import main
from multitune.compare.run import compare
from multitune.compare.search import (
    chosen_trial,
    default_params,
    open_study,
    rescue_params,
    settings_for,
    suggest,
)
from multitune.compare.settings import CompareConfig
from multitune.config import DataConfig, TrainConfig
from multitune.health.profile import PROFILE_FILES, load_profile
from multitune.methods import METHODS


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("compare") / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows([(ex.text, ex.label) for ex in toy_sentiment(120)])
    return str(path)


def _args(bert_dir, data_csv, out, methods="lora,prompting", trials=2, *extra: str) -> list[str]:
    return [
        "compare",
        "--model",
        str(bert_dir),
        "--data",
        data_csv,
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--methods",
        methods,
        "--trials",
        str(trials),
        "--max-epochs",
        "2",
        "--batch-size",
        "8",
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]


def _config(bert_dir, data_csv, out, methods, trials=2, isolate=False) -> CompareConfig:
    return CompareConfig(
        model=str(bert_dir),
        methods=methods,
        trials=trials,
        max_epochs=2,
        output=str(out),
        isolate=isolate,
        progress=False,
        data=DataConfig(data=data_csv, text_column="review", label_column="stars"),
        train=TrainConfig(batch_size=8),
    )


def test_compare_end_to_end(bert_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(_args(bert_dir, data_csv, out, "lora,prompting,prefix")) == 0
    printed = capsys.readouterr().out
    for method in ("lora", "prompting", "prefix"):
        result = json.loads((out / "results" / f"{method}.json").read_text())
        assert result["method"] == method and result["metric"] == "accuracy"
        low, high = result["test_ci"]["accuracy"]
        assert low <= result["test"]["accuracy"] <= high
        assert result["trials"]["complete"] + result["trials"]["pruned"] == 2
        assert result["peak_memory_bytes"] > 50e6  # a whole process with torch: tens of MB at least
        adapter = out / result["adapter"]
        weights = [p for p in adapter.iterdir() if p.name not in PROFILE_FILES]  # the drift profile is apart
        assert result["stored_bytes"] == sum(p.stat().st_size for p in weights)
        assert load_profile(adapter) is not None
        assert result["storage_100_tasks_bytes"] == result["base_bytes"] + 100 * result["stored_bytes"]
        assert result["latency_ms"] > 0 and result["throughput_per_s"] > 0
        assert method in printed
    lora, prompting, prefix = (
        json.loads((out / "results" / f"{m}.json").read_text()) for m in ("lora", "prompting", "prefix")
    )
    assert prompting["trainable_parameters"] == 0 and prompting["steps"] == 0
    assert lora["trainable_parameters"] > 0 and lora["steps"] > 0
    # prefix tuning trains an MLP and stores the folded prefixes: stored bytes < 4 x trainable parameters
    assert prefix["stored_bytes"] < 4 * prefix["trainable_parameters"]
    # one study per method, in SQLite, holding the trials
    for method in ("lora", "prompting", "prefix"):
        study = optuna.load_study(study_name=f"task-{method}", storage=f"sqlite:///{out / 'study.db'}")
        assert len(study.trials) == 2
        assert study.trials[0].params == default_params(method, 2, head=True)  # the defaults are tried first
    # the report and the bank, ready to serve
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    from multitune.serve.engine import Engine

    engine = Engine.from_folder(out / "bank")
    assert set(engine.tasks) == {"task-lora", "task-prompting", "task-prefix"}
    probs = engine.classify([("task-lora", "a great movie"), ("task-prefix", "awful food")])
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)


def test_rerun_keeps_finished_methods(bert_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    compare(_config(bert_dir, data_csv, out, ["ia3"]), log=lambda _: None)
    first = (out / "results" / "ia3.json").stat().st_mtime_ns
    adapter = (out / "bank" / "task-ia3" / "adapter.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    summary = compare(_config(bert_dir, data_csv, out, ["ia3", "prompting"]), log=lines.append)
    assert any("ia3: done in an earlier run" in line for line in lines)
    assert (out / "results" / "ia3.json").stat().st_mtime_ns == first
    assert (out / "bank" / "task-ia3" / "adapter.safetensors").stat().st_mtime_ns == adapter
    assert [r["method"] for r in summary["results"]] == ["ia3", "prompting"]


def _final_runs_of(out: Path) -> list[int]:
    """Processes running `python -m multitune.compare.run PAYLOAD` for the comparison in ``out``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "multitune.compare" in cmdline and str(out) in cmdline:
            found.append(int(proc.name))
    return found


def test_killed_compare_resumes_without_retraining(bert_dir, data_csv, tmp_path):
    """Kill compare during the second method's final run; the rerun keeps the first and finishes the second."""
    out = tmp_path / "cmp"
    argv = [sys.executable, "-m", "multitune", *_args(bert_dir, data_csv, out, "lora,adapter", 3)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = out / "results" / "lora.json"
    second_final = out / "results" / ".adapter.payload.json"  # the second method's final run has started
    deadline = time.time() + 600  # a wait, not a speed check: a loaded machine is slow
    while (
        not (second_final.exists() and _final_runs_of(out))
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    assert done.exists() and _final_runs_of(out), process.communicate()[0].decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10  # the final run's own process ends with its parent
    while _final_runs_of(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not _final_runs_of(out)
    assert not (out / "results" / "adapter.json").exists()  # killed before the second method finished
    stamp = done.stat().st_mtime_ns
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "lora: done in an earlier run" in rerun.stdout
    assert done.stat().st_mtime_ns == stamp
    assert json.loads((out / "results" / "adapter.json").read_text())["method"] == "adapter"
    study = optuna.load_study(study_name="task-adapter", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) == 3  # a trial cut by the kill is marked failed and replaced, not counted


def test_poor_trials_are_pruned(bert_dir, data_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number >= 2)
    lines: list[str] = []
    config = _config(bert_dir, data_csv, tmp_path / "cmp", ["lora"], trials=4)
    config.search_only = True
    compare(config, log=lines.append)
    study = optuna.load_study(study_name="task-lora", storage=config.storage_url())
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert states[2:] == [optuna.trial.TrialState.PRUNED] * 2
    assert sum("-> pruned" in line for line in lines) == 2, lines
    pruned = study.trials[2]
    assert list(pruned.intermediate_values) == [1]  # stopped after its first epoch


def test_search_spaces_cover_the_key_settings():
    study = optuna.create_study()
    for method in ("full", "lora", "prefix", "adapter", "prompt", "ia3", "prompting"):
        trial = study.ask()
        params = suggest(trial, method, 3, head=True)
        method_config, train = settings_for(_config("m", "d.csv", "o", [method]), method, params)
        if method not in ("prompting",):  # the head's own rate is searched, around its default
            assert train.head_learning_rate == params["head_learning_rate"]
        assert isinstance(method_config, METHODS[method].config_class)
        if method == "prompting":
            assert "learning_rate" not in params and method_config.shots == params["prompting.shots"]
            continue
        default = METHODS[method].default_learning_rate
        assert default / 5 <= train.learning_rate <= default * 5 and 1 <= train.epochs <= 3
        for key in params:
            if key.startswith(f"{method}."):
                assert getattr(method_config, key.split(".", 1)[1]) == params[key]
    assert {n for n, m in METHODS.items() if m.search is not None} == {
        "lora",
        "prefix",
        "prompt",
        "adapter",
        "prompting",
    }
    lora, _ = settings_for(_config("m", "d.csv", "o", ["lora"]), "lora", {"lora.rank": 16})
    assert lora.rank == 16 and lora.alpha == 32


def test_search_dora_makes_use_dora_a_setting_of_lora_search(bert_dir, data_csv, tmp_path, capsys):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    chosen = {suggest(study.ask(), "lora", 2, dora=True)["lora.use_dora"] for _ in range(12)}
    assert chosen == {False, True}  # both are tried
    assert "lora.use_dora" not in suggest(study.ask(), "lora", 2)  # off unless asked
    assert default_params("lora", 2, dora=True)["lora.use_dora"] is False  # the first trial: plain LoRA
    config = _config(bert_dir, data_csv, tmp_path / "o", ["lora"])
    dora, _ = settings_for(config, "lora", {"lora.rank": 4, "lora.use_dora": True})
    assert dora.use_dora and dora.rank == 4
    assert main(_args(bert_dir, data_csv, tmp_path / "run", "lora", 3, "--search-dora")) == 0
    trials = optuna.load_study(
        study_name="task-lora", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    ).get_trials()
    assert all("lora.use_dora" in t.params for t in trials)
    result = json.loads((tmp_path / "run" / "results" / "lora.json").read_text())
    assert "lora.use_dora" in result["best_params"]
    assert "use_dora" in capsys.readouterr().out
    from multitune.compare.table import describe_params

    assert describe_params({"lora.rank": 8, "lora.use_dora": True}) == "rank 8, DoRA"
    assert describe_params({"lora.use_dora": False}) == "plain LoRA"


def test_fixed_method_flags_are_kept(bert_dir, data_csv, tmp_path):
    from multitune.cli import build_parser
    from multitune.compare.cli import compare_config

    args = build_parser().parse_args(
        _args(bert_dir, data_csv, tmp_path / "o", "lora", 2, "--lora-dropout", "0.2")
    )
    config = compare_config(args)
    method_config, _ = settings_for(config, "lora", {"lora.rank": 4})
    assert method_config.dropout == 0.2 and method_config.rank == 4
    assert config.seeds == 1  # the default: today's compare, one final run
    seeded = build_parser().parse_args(_args(bert_dir, data_csv, tmp_path / "o", "lora", 2, "--seeds", "3"))
    assert compare_config(seeded).seeds == 3


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--methods", "lora,nope"], "unknown method(s) nope"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1 (got 0)"),
        (["--seeds", "-3"], "--seeds must be >= 1 (got -3)"),
        (["--methods", "lora,lora"], "named twice"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the study storage"),
        (["--storage", "mysql://x@127.0.0.1:1/none"], "needs a database driver"),
        (["--methods", "prompting", "--search-dora"], "--search-dora searches LoRA's use_dora; add lora"),
        (["--search-dora", "--lora-use-dora"], "--lora-use-dora fixes it; drop one of them"),
    ],
)
def test_bad_input_is_one_line(bert_dir, data_csv, tmp_path, capsys, extra, expected):
    assert main(_args(bert_dir, data_csv, tmp_path / "o") + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_changed_settings_do_not_resume(bert_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "o"
    compare(_config(bert_dir, data_csv, out, ["prompting"]), log=lambda _: None)
    assert main(_args(bert_dir, data_csv, out, "prompting", 3)) == 2
    err = capsys.readouterr().err
    assert "other settings (trials)" in err
    assert (out / "results" / "prompting.json").exists()  # nothing lost
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(_args(bert_dir, data_csv, other)) == 2
    assert "not a comparison folder" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_a_failing_method_is_reported_and_the_exit_is_nonzero(bert_dir, data_csv, tmp_path, capsys):
    """One method's user error does not stop the others; the command says which failed and exits 2."""
    out = tmp_path / "o"
    argv = _args(
        bert_dir, data_csv, out, "prompt,prompting", 1, "--prompt-init", "text"
    )  # init=text, no text
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "error: prompt: " in captured.out and "init" in captured.out
    assert "1 method(s) failed (prompt)" in captured.err
    assert (out / "results" / "prompting.json").exists() and not (out / "results" / "prompt.json").exists()


def test_study_is_shared_by_name(tmp_path):
    config = _config("m", "d.csv", tmp_path, ["lora"], trials=3)
    first = open_study(config, "lora")
    assert len(first.get_trials(states=[optuna.trial.TrialState.WAITING])) == 1  # the defaults, queued
    again = open_study(config, "lora")
    assert again._study_id == first._study_id
    assert len(again.get_trials()) == 1  # the default trial is queued once, not per worker
    assert Path(tmp_path / "study.db").is_file()


def test_two_workers_share_one_study_in_postgres(bert_dir, data_csv, tmp_path, postgres_url):
    """Two `compare --search-only` workers fill one PostgreSQL study; a third worker retrains its best."""
    optuna.storages.RDBStorage(postgres_url)  # the schema, created once before the workers race for it
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shared = ["--storage", postgres_url, "--study-name", "shared"]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "multitune",
                *_args(bert_dir, data_csv, tmp_path / f"worker{i}", "lora", 4, *shared, "--search-only"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="shared-lora", storage=postgres_url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in states]
    # Each worker counts the trials before asking for one, so both may start one when 3 are counted: 4 or 5.
    assert 4 <= len(finished) <= 5
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers contributed
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not any("final run" in out for out in outputs)  # --search-only: no final runs

    assert main(_args(bert_dir, data_csv, tmp_path / "final", "lora", 4, *shared)) == 0
    assert len(optuna.load_study(study_name="shared-lora", storage=postgres_url).trials) == len(study.trials)
    result = json.loads((tmp_path / "final" / "results" / "lora.json").read_text())
    chosen = chosen_trial(study).params  # the best trial that learned (the best, if none did)
    rescued = "rescue" in result  # tiny models may not learn: then a quarter of the learning rate is tried
    assert result["best_params"] == (rescue_params("lora", chosen) if rescued else chosen)


def test_generation_tasks_compare_on_rouge_l(llama_dir, tmp_path):
    from helpers import toy_generation

    data = tmp_path / "gen.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows([(ex.text, ex.response) for ex in toy_generation(40)])
    config = CompareConfig(
        model=str(llama_dir),
        kind="generation",
        methods=["lora", "prompting"],
        trials=1,
        max_epochs=1,
        output=str(tmp_path / "o"),
        isolate=False,
        progress=False,
        data=DataConfig(data=str(data), prompt_column="prompt", response_column="response"),
        train=TrainConfig(batch_size=8, max_new_tokens=4),
    )
    summary = compare(config, log=lambda _: None)
    for result in summary["results"]:
        assert result["metric"] == "rouge_l" and result["higher_is_better"]
        assert {"rouge_l", "exact_match", "loss"} <= set(result["test"])
        low, high = result["test_ci"]["rouge_l"]
        assert low <= result["test"]["rouge_l"] <= high
    assert (tmp_path / "o" / "report.html").is_file()


def test_a_second_compare_into_a_held_folder_is_refused_and_changes_nothing(
    bert_dir, data_csv, tmp_path, capsys
):
    """Two workers into one folder on one machine too: the second says who holds it and exits 2."""
    from test_storage import _holder

    out = tmp_path / "cmp"
    holder = _holder(out)
    try:
        for extra in ([], ["--search-only"]):
            assert main(_args(bert_dir, data_csv, out, "prompting", 1, *extra)) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and f"process {holder.pid}" in err and err.count("\n") == 1
            assert list(out.iterdir()) == []  # no compare.json, no study.db
    finally:
        holder.kill()
        holder.wait()


def test_a_trial_failed_by_another_process_while_it_runs_is_dropped_not_fatal(
    bert_dir, data_csv, tmp_path, monkeypatch
):
    """A worker sharing the study that takes our running trial for a dead one: we say so and run another."""
    import multitune.compare.search as compare_module

    config = _config(bert_dir, data_csv, tmp_path / "cmp", ["lora"], trials=2)
    config.storage = f"sqlite:///{tmp_path / 'shared.db'}"
    config.search_only = True
    real = compare_module.fit_and_score
    calls = []

    def failed_under_us(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # what another worker's stale-trial sweep does to ours
            other = optuna.load_study(study_name="task-lora", storage=config.storage)
            for trial in other.get_trials(states=[optuna.trial.TrialState.RUNNING]):
                other.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "fit_and_score", failed_under_us)
    lines: list[str] = []
    compare(config, log=lines.append)
    assert any("trial 1/2: marked failed by another process" in line for line in lines), lines
    study = optuna.load_study(study_name="task-lora", storage=config.storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2


def test_a_second_demo_into_a_held_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    from test_storage import _holder

    out = tmp_path / "demo"
    holder = _holder(out)
    try:
        assert main(["demo", "--output", str(out), "--quiet"]) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
        assert list(out.iterdir()) == []  # no data.csv written
    finally:
        holder.kill()
        holder.wait()
