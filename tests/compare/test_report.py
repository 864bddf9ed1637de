"""The compare report: table formatting, missing fields, escaping, plots, and the HTML in a real browser."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
from helpers.browser import CHROMIUM, CHROMIUM_ARGS, distinct_colours

from multitune.compare.report import write_report
from multitune.compare.table import describe_params, human_bytes

META = {
    "model": "minilm",
    "data": "/path/data.csv",
    "task": "demo",
    "kind": "classification",
    "examples": {"train": 640, "validation": 80, "test": 80},
    "trials": 4,
    "device": "cpu",
    "command": "multitune compare --data /path/data.csv --methods lora,full,prompting",
    "wall_seconds": 312.4,
    "metric": "accuracy",
    "higher_is_better": True,
    "started": "2026-11-24 16:40 UTC",
}

LORA = {
    "method": "lora",
    "task": "demo-lora",
    "kind": "classification",
    "metric": "accuracy",
    "higher_is_better": True,
    "best_params": {"learning_rate": 0.002, "lora.rank": 8, "epochs": 2},
    "trials": {"complete": 3, "pruned": 1, "failed": 0},
    "search_seconds": 40.2,
    "trainable_parameters": 74498,
    "trainable_percent": 0.33,
    "stored_bytes": 301234,
    "base_bytes": 90264584,
    "storage_100_tasks_bytes": 120387984,
    "peak_memory_bytes": 812000000,
    "memory_kind": "rss",
    "train_seconds": 12.3,
    "steps": 80,
    "latency_ms": 8.1,
    "throughput_per_s": 250.0,
    "validation": {"accuracy": 0.9},
    "test": {"accuracy": 0.91, "macro_f1": 0.9, "loss": 0.3},
    "test_ci": {"accuracy": [0.88, 0.93]},
    "test_examples": 160,
    "adapter": "bank/demo-lora",
}
FULL = {
    **LORA,
    "method": "full",
    "task": "demo-full",
    "best_params": {"learning_rate": 5e-05, "epochs": 3},
    "trainable_parameters": 22713218,
    "trainable_percent": 100.0,
    "stored_bytes": 90264584,
    "base_bytes": 0,
    "storage_100_tasks_bytes": 9026458400,
    "peak_memory_bytes": 1450000000,
    "train_seconds": 140.0,
    "steps": 120,
    "latency_ms": 8.0,
    "validation": {"accuracy": 0.93},
    "test": {"accuracy": 0.92, "macro_f1": 0.91, "loss": 0.25},
    "test_ci": {"accuracy": [0.89, 0.95]},
}
PROMPTING = {
    **LORA,
    "method": "prompting",
    "task": "demo-prompting",
    "best_params": {"prompting.shots": 4, "prompting.selection": "similar"},
    "trainable_parameters": 0,
    "trainable_percent": 0.0,
    "stored_bytes": 812,
    "storage_100_tasks_bytes": 90264584 + 81200,
    "peak_memory_bytes": 400000000,
    "train_seconds": 0.0,
    "steps": 0,
    "latency_ms": 30.5,
    "throughput_per_s": 40.0,
    "validation": {"accuracy": 0.6},
    "test": {"accuracy": 0.61},
    "test_ci": {"accuracy": [0.55, 0.68]},
    "trials": {"complete": 4, "pruned": 0, "failed": 0},
}


def results() -> list[dict]:
    return copy.deepcopy([LORA, FULL, PROMPTING])


def md_rows(md: str) -> list[list[str]]:
    """The body rows of the first Markdown table, as lists of cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return body


@pytest.fixture
def report(tmp_path):
    paths = write_report(tmp_path / "out", results(), META)
    return paths, paths["md"].read_text(), paths["html"].read_text()


def test_files_exist_and_are_returned(report, tmp_path):
    paths, _, html = report
    assert set(paths) == {"md", "html", "quality_vs_parameters", "quality_vs_time", "memory"}
    out = tmp_path / "out"
    assert paths["md"] == out / "report.md" and paths["html"] == out / "report.html"
    for name in ("quality_vs_parameters", "quality_vs_time", "memory"):
        assert paths[name] == out / "plots" / f"{name}.png"
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert html.count('<img class="plot"') == 3


def test_markdown_table_has_a_row_per_method_with_formatted_numbers(report):
    _, md, _ = report
    rows = md_rows(md)
    assert [r[0] for r in rows] == ["lora", "full", "prompting"]
    lora, full, prompting = rows
    assert lora[1] == "lr 2e-3, rank 8, 2 epochs"
    assert lora[2] == "74,498 (0.33%)"
    assert lora[3] == "301 kB"
    assert lora[4] == "120 MB"
    assert lora[5] == "812 MB (rss)"
    assert lora[6] == "12.3 s (80 steps)"
    assert lora[7] == "8.1 ms (250/s)"
    assert lora[8] == "0.910 [0.880, 0.930]"
    assert lora[9] == "0.900"
    assert lora[10] == "3 / 1"
    assert full[4] == "9.0 GB (100 models)"
    assert full[8] == "**0.920 [0.890, 0.950]**", "the best test metric is bold"
    assert prompting[2] == "0 (no training)" and prompting[6] == "no training"
    assert sum("**" in cell for row in rows for cell in row) == 1
    for path in ("plots/quality_vs_parameters.png", "plots/quality_vs_time.png", "plots/memory.png"):
        assert f"]({path})" in md


def test_reading_the_table_is_computed_from_the_data(report):
    _, md, _ = report
    reading = md.split("## Reading the table", 1)[1].split("## Plots", 1)[0]
    assert "Best test accuracy (higher is better): full fine-tuning, 0.920 [0.890, 0.950] on 160" in reading
    assert "lora 0.910 with 0.33% of the parameters" in reading
    assert "prompting 0.610 with no training" in reading
    assert (
        "For 100 tasks full fine-tuning stores 9.0 GB (100 whole models) against 90 MB for prompting, "
        "120 MB for lora."
    ) in reading
    assert "overlap" in reading  # [0.89, 0.95] and [0.88, 0.93]
    # Changing the data changes the facts: nothing is canned.
    changed = results()
    changed[0]["test"]["accuracy"] = 0.97
    changed[0]["test_ci"]["accuracy"] = [0.96, 0.98]
    md2 = write_report(Path(report[0]["md"]).parent / "again", changed, META)["md"].read_text()
    assert "Best test accuracy (higher is better): lora, 0.970 [0.960, 0.980]" in md2
    assert "do not overlap" in md2


def test_helpers():
    assert human_bytes(301234) == "301 kB"
    assert human_bytes(9026458400) == "9.0 GB"
    assert human_bytes(999) == "999 B"
    assert human_bytes(999_600) == "1.0 MB"
    assert human_bytes(None) == "n/a" and human_bytes(float("nan")) == "n/a"
    assert (
        describe_params({"learning_rate": 0.00025, "prefix.num_virtual_tokens": 10, "epochs": 1})
        == "lr 2.5e-4, tokens 10, 1 epoch"
    )
    assert describe_params(None) == "n/a"


def test_missing_fields_render_na(tmp_path):
    sparse = {
        "method": "ia3",
        "test": {"accuracy": None},
        "test_ci": None,
        "trials": None,
        "peak_memory_bytes": float("nan"),
    }
    paths = write_report(tmp_path, [*results(), sparse, {"method": "adapter"}], {})
    rows = md_rows(paths["md"].read_text())
    assert [r[0] for r in rows] == ["lora", "full", "prompting", "ia3", "adapter"]
    for row in rows[3:]:
        assert row[1:] == ["n/a"] * 10
    html = paths["html"].read_text()
    assert len(re.findall(r'<td class="\w+">n/a</td>', html)) == 20, "10 cells of each sparse row"
    assert "<dt>Model</dt><dd>n/a</dd>" in html


def test_no_results_and_nothing_plottable_still_writes_everything(tmp_path):
    paths = write_report(tmp_path, [{"method": "lora"}], {"metric": "accuracy"})
    for path in paths.values():
        assert path.stat().st_size > 100
    paths = write_report(tmp_path / "empty", [], {})
    assert "No numbers to compare." in paths["md"].read_text()


def test_zero_parameter_prompting_alone_is_plotted(tmp_path):
    from PIL import Image

    paths = write_report(tmp_path, [copy.deepcopy(PROMPTING)], META)
    with Image.open(paths["quality_vs_parameters"]) as image:
        assert image.width > 500 and len(image.convert("RGB").getcolors(1 << 20)) > 20


def test_html_is_self_contained(report):
    _, _, html = report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert (
        len(re.findall(r'<img class="plot" [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', html))
        == 3
    )
    assert re.search(r'<table id="comparison">', html)
    for text in (
        "minilm",
        "/path/data.csv",
        "640 train, 80 validation, 80 test",
        "cpu",
        "5.2 min",
        "multitune compare --data /path/data.csv",
    ):
        assert text in html


def test_user_strings_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    bad = results()
    bad[0]["method"] = f"lora{evil}"
    bad[1]["best_params"] = {"note": evil}
    meta = {**META, "data": f"/tmp/{evil}.csv", "command": f"multitune compare {evil}", "model": '"><b>x</b>'}
    paths = write_report(tmp_path, bad, meta)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert "<script" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in md.split("```")[0] + md.split("```")[-1]
    assert md_rows(md)[0][0] == "lora&lt;script&gt;alert(1)&lt;/script&gt;"


def test_lower_is_better_bolds_the_lowest(tmp_path):
    generation = results()
    for result, loss in zip(generation, (2.5, 1.9, 3.0), strict=True):
        result.update(
            kind="generation",
            metric="loss",
            higher_is_better=False,
            test={"loss": loss, "rouge_l": 0.3},
            test_ci={"rouge_l": [0.2, 0.4]},
            validation={"loss": loss + 0.1},
        )
    meta = {**META, "kind": "generation", "metric": "loss", "higher_is_better": False}
    paths = write_report(tmp_path, generation, meta)
    rows = md_rows(paths["md"].read_text())
    assert [r[8] for r in rows] == ["2.500", "**1.900**", "3.000"]
    html = paths["html"].read_text()
    assert "<strong>1.900</strong>" in html and html.count("<strong>") == 1
    assert "lower is better" in paths["md"].read_text()


def test_rewriting_replaces_the_report(tmp_path):
    write_report(tmp_path, results(), META)
    paths = write_report(tmp_path, results()[:1], META)
    assert [r[0] for r in md_rows(paths["md"].read_text())] == ["lora"]
    assert not [p for p in tmp_path.rglob(".*")]


# ---- methods that did not learn, rescues, seeds ------------------------------------------------------------
PROBLEM = (
    "task 'demo-full' did not learn: its weights predict one label for every validation example (accuracy 0.500, "
    "the share of that label); likely cause: a learning rate too high for full (1.2e-05: the updates overshoot "
    "and the model settles on one answer); try --learning-rate 3e-06"
)


def _not_learned(result: dict, rescued: bool = False) -> dict:
    rescue = {
        "after": "final run",
        "from_params": {"learning_rate": 6e-05, "epochs": 3},
        "problem": PROBLEM.replace("1.2e-05", "6e-05"),
        "params": {"learning_rate": 1.5e-05, "epochs": 3},
        "learned": rescued,
    }
    problem = None if rescued else PROBLEM.replace("1.2e-05", "1.5e-05")
    return {
        **result,
        "best_params": rescue["params"],
        "learned": rescued,
        "problem": problem,
        "rescue": rescue,
    }


def test_a_non_learner_shows_did_not_learn_and_is_never_ranked(tmp_path):
    """full has the highest test score but did not learn: it is not bold, not best, not in any claim of quality."""
    lora, full, prompting = results()
    paths = write_report(tmp_path, [lora, _not_learned(full), prompting], META)
    md = paths["md"].read_text()
    rows = md_rows(md)
    assert rows[1][8] == "did not learn (scored 0.920)"
    assert rows[0][8] == "**0.910 [0.880, 0.930]**" and sum("**" in c for r in rows for c in r) == 1
    assert rows[1][1] == "lr 1.5e-5, 3 epochs (rescue run)"
    reading = md.split("## Reading the table", 1)[1].split("## Plots", 1)[0]
    assert "Best test accuracy (higher is better): lora, 0.910" in reading
    assert "Runner-up: prompting, 0.610" in reading
    assert (
        "full fine-tuning did not learn: its weights predict one label for every validation example (accuracy "
        "0.500, the share of that label); the rescue run at a quarter of the learning rate (lr 1.5e-5) did not "
        "learn either. Its test accuracy (0.920) is not its quality on this task, so it is not ranked. The likely "
        "cause: a learning rate too high for full" in reading
    )
    assert "try --learning-rate 3e-06, with multitune train --method full." in reading
    assert "full fine-tuning 0.920" not in reading  # no efficiency claim for it
    assert '"did not learn": the method' in md
    html = paths["html"].read_text()
    assert html.count("<strong>") == 1 and "<strong>0.910" in html
    assert '<td class="test">did not learn<br><span class="detail">(scored 0.920)</span></td>' in html
    for name in ("quality_vs_parameters", "quality_vs_time"):
        assert distinct_colours(paths[name].read_bytes()) > 20


def test_when_no_method_learned_none_is_ranked_and_plots_still_draw(tmp_path):
    lora, full, _ = results()
    sparse = {"method": "prefix", "learned": False, "problem": None, "test": {"accuracy": None}}
    paths = write_report(tmp_path, [_not_learned(lora), _not_learned(full), sparse], META)
    md = paths["md"].read_text()
    assert "**" not in md.split("## Comparison", 1)[1].split("## Reading", 1)[0]
    reading = md.split("## Reading the table", 1)[1]
    assert "No method learned, so none is ranked." in reading and "Best test" not in reading
    assert "prefix did not learn: no reason recorded. Its test accuracy is not its quality" in reading
    assert md_rows(md)[2][8] == "did not learn"
    for name in ("quality_vs_parameters", "quality_vs_time", "memory"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"


def test_a_rescued_method_is_ranked_and_says_it_was_rescued(tmp_path):
    lora, full, prompting = results()
    paths = write_report(tmp_path, [lora, _not_learned(full, rescued=True), prompting], META)
    md = paths["md"].read_text()
    assert md_rows(md)[1][8] == "**0.920 [0.890, 0.950]**" and md_rows(md)[1][1].endswith("(rescue run)")
    assert (
        "full fine-tuning was rescued: its final run did not learn at lr 6e-5, 3 epochs (its weights predict one "
        "label for every validation example (accuracy 0.500, the share of that label)); one more run at a "
        "quarter of the learning rate (lr 1.5e-5) learned, and the row is that run."
    ) in md


def _seeds(mean: float, std: float | None, low: float, high: float, n: int = 3, learned: int = 3) -> dict:
    return {"trains": True, "n": n, "learned": learned, "mean": mean, "std": std, "min": low, "max": high}


def test_seeds_give_a_column_and_say_what_is_within_seed_noise(tmp_path):
    lora, full, prompting = results()
    lora["seeds"] = _seeds(0.905, 0.010, 0.89, 0.92)
    full["seeds"] = _seeds(0.912, 0.004, 0.907, 0.918)
    prompting["seeds"] = {"trains": False, "n": 1, "learned": 1, "mean": 0.61, "std": None, "min": 0.61}
    paths = write_report(tmp_path, [lora, full, prompting], {**META, "seeds": 3})
    md = paths["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "| Test accuracy over seeds: mean ± std (min–max) |" in header
    rows = md_rows(md)
    assert [r[9] for r in rows] == [
        "0.905 ± 0.010 (0.890–0.920, 3 seeds)",
        "0.912 ± 0.004 (0.907–0.918, 3 seeds)",
        "0.610 (no training: one run)",
    ]
    assert "- **Seeds per method**: 3" in md
    reading = md.split("## Reading the table", 1)[1].split("## Plots", 1)[0]
    assert (
        "Seed noise: two methods differ by no more than seed noise when the difference of their mean test "
        "accuracy over seeds is no larger than the larger of their two standard deviations. Best mean: full "
        "fine-tuning, 0.912 ± 0.004; within seed noise of it (difference against the larger std): lora (0.007 "
        "against 0.010); beyond seed noise (difference against the larger std): prompting (0.302 against 0.004)."
    ) in reading
    assert "over seeds the difference of their means (0.007) is within seed noise" in reading  # runner-up

    lora["seeds"] = _seeds(0.85, 0.2, 0.5, 0.95, learned=2)  # one seed did not learn
    full["seeds"]["std"] = 0.01
    lora["test"]["accuracy"] = 0.93  # lora now best by its final run; full is the runner-up
    md = write_report(tmp_path / "again", [lora, full, prompting], META)["md"].read_text()
    assert md_rows(md)[0][9] == "0.850 ± 0.200 (0.500–0.950, 2 of 3 seeds learned)"
    assert "lora: 2 of 3 seeds learned; a seed run that did not learn counts in the mean and spread." in md
    assert "within seed noise of it (difference against the larger std): lora (0.062 against 0.200)" in md
    assert "over seeds the difference of their means (0.062) is within seed noise" in md

    full["seeds"] = _seeds(0.95, 0.005, 0.945, 0.955)
    lora["seeds"] = _seeds(0.90, 0.01, 0.89, 0.91)
    md = write_report(tmp_path / "beyond", [lora, full, prompting], META)["md"].read_text()
    assert (
        "over seeds the difference of their means (0.050) is beyond seed noise (the larger std is 0.010)"
        in md
    )


def test_seeds_of_a_non_learner_and_broken_seed_fields(tmp_path):
    lora, full, prompting = results()
    full = _not_learned(full)
    full["seeds"] = _seeds(0.93, 0.01, 0.92, 0.94, learned=0)
    lora["seeds"] = _seeds(0.905, 0.010, 0.89, 0.92)
    prompting["seeds"] = {"n": "three", "mean": float("nan"), "std": "x"}
    paths = write_report(tmp_path, [lora, full, prompting], META)
    md = paths["md"].read_text()
    rows = md_rows(md)
    assert rows[1][9] == "did not learn (0 of 3 seeds learned)" and rows[2][9] == "n/a"
    assert "Seed noise" not in md  # one method with a usable spread only: nothing to set it against
    lora.pop("seeds")
    full.pop("seeds")
    rows = md_rows(write_report(tmp_path / "none", [lora, full, prompting], META)["md"].read_text())
    assert len(rows[0]) == 11  # no row has several seeds: no seeds column


# ---- the HTML in a real browser --------------------------------------------------------------------------
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt install chromium)"
)
@pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None,
    reason="needs the playwright package (pip install -e .[dev])",
)
def test_html_renders_in_headless_chromium(tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    many = [
        *results(),
        {
            **copy.deepcopy(LORA),
            "method": "adapter",
            "trainable_parameters": 300000,
            "trainable_percent": 1.3,
            "train_seconds": 30.0,
            "test": {"accuracy": 0.9},
        },
    ]
    paths = write_report(tmp_path / "out", many, META)
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(paths["html"].resolve().as_uri(), wait_until="load")
            table = page.locator("table#comparison")
            assert table.is_visible()
            assert table.locator("tbody tr").count() == len(many)
            assert table.locator("tbody tr th").all_inner_texts() == ["lora", "full", "prompting", "adapter"]
            plots = page.locator("img.plot")
            assert plots.count() == 3
            for i in range(3):
                plot = plots.nth(i)
                assert plot.is_visible()
                assert plot.evaluate("img => img.complete && img.naturalWidth") > 100
                box = plot.bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 100
                shot = plot.screenshot()
                assert distinct_colours(shot) > 20, f"plot {i} looks blank"
            # The table fits the page: no horizontal scrolling at 1280 px.
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            full = tmp_path / "report.png"
            page.screenshot(path=str(full), full_page=True)
        finally:
            browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    with Image.open(full) as image:
        assert image.format == "PNG"
        assert image.width >= 1280 and image.height > 900
    assert distinct_colours(full.read_bytes()) > 200


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    import sys

    import matplotlib

    backend = matplotlib.get_backend()
    figures = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else None
    write_report(tmp_path, results(), META)
    assert matplotlib.get_backend() == backend
    if figures is not None:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == figures
