"""The run report of the preference commands: curves.png and a self-contained report.html."""

from __future__ import annotations

import base64
import io
import math
import re

from helpers.browser import CHROMIUM, CHROMIUM_ARGS, distinct_colours, needs_chromium

from multitune.preference.report import _panels, plot_curves, render_html, write_run_report


def policy_steps(n: int = 30) -> list[dict]:
    return [
        {
            "step": i + 1,
            "score": 0.5 + 0.4 * i / n,
            "score_std": 0.1,
            "score_std_in_group": 0.08,
            "kl": 0.01 * i,
            "entropy": 2.0 - 0.02 * i,
            "clip_fraction": 0.05,
            "loss": -0.01 * i,
            "response_length": 12.0,
            "seconds": 1.5,
        }
        for i in range(n)
    ]


def pair_run() -> tuple[list[dict], list[dict]]:
    steps = [{"step": i + 1, "epoch": 1, "loss": 0.69 - 0.01 * i, "margin": 0.02 * i, "accuracy": 0.5 + 0.01 * i,
              "lr": 1e-3} for i in range(40)]  # fmt: skip
    evals = [{"step": s, "split": "validation", "accuracy": a, "margin": 0.1 * s, "loss": 0.7 - 0.005 * s}
             for s, a in ((0, 0.5), (20, 0.7), (40, 0.8))]  # fmt: skip
    return steps, evals


def titles(steps, evals) -> list[str]:
    return [title for title, _, _ in _panels(steps, evals)]


def test_panels_follow_what_the_run_logged() -> None:
    policy = titles(policy_steps(), [])
    assert policy == [
        "Reward (mean of the step's responses)",
        "KL to the reference",
        "Entropy (nats per token)",
        "Clip fraction",
        "Losses",
        "Response length (tokens)",
    ]
    steps, evals = pair_run()
    assert titles(steps, evals) == ["Losses", "Accuracy", "Margin"]
    # the losses panel of a pair run holds the training and the held-out loss; accuracy both series
    panels = {title: lines for title, lines, _ in _panels(steps, evals)}
    assert [line[0] for line in panels["Losses"]] == ["training loss", "held-out loss"]
    assert [line[0] for line in panels["Accuracy"]] == ["held-out", "training batches"]
    assert panels["Accuracy"][0][1] == [0.0, 20.0, 40.0] and panels["Accuracy"][0][2] == [0.5, 0.7, 0.8]
    # the reward's band is its spread, step by step; a NaN or a missing value is left out, not drawn as 0
    band = _panels(policy_steps(), [])[0][2]
    assert band == [0.1] * 30
    broken = policy_steps(3)
    broken[1]["kl"] = math.nan
    del broken[2]["entropy"]
    lines = {title: lines for title, lines, _ in _panels(broken, [])}
    assert lines["KL to the reference"][0][1] == [1.0, 3.0]
    assert lines["Entropy (nats per token)"][0][1] == [1.0, 2.0]


def test_curves_are_a_png_with_one_panel_per_statistic() -> None:
    from PIL import Image

    steps, evals = pair_run()
    for png in (plot_curves(policy_steps(), []), plot_curves(steps, evals), plot_curves([], [])):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(png))
        assert image.width > 300 and image.height > 200
    # six panels take two rows of three, three panels one row: the figure's height says so
    tall = Image.open(io.BytesIO(plot_curves(policy_steps(), [])))
    short = Image.open(io.BytesIO(plot_curves(steps, evals)))
    assert tall.height > 1.8 * short.height and tall.width == short.width


def test_html_is_self_contained_escaped_and_holds_the_figure(tmp_path) -> None:
    steps, evals = pair_run()
    summary = {"command": "dpo", "task": "<b>t</b>", "model": "m", "steps": 40, "seconds": 12.5,
               "preference_accuracy": {"before": 0.5, "after": 0.8}}  # fmt: skip
    paths = write_run_report(tmp_path, summary, steps, evals)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "report.html"]
    page = paths["html"].read_text()
    assert "<b>t</b>" not in page and "&lt;b&gt;t&lt;/b&gt;" in page
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded is not None and base64.b64decode(embedded.group(1)) == paths["png"].read_bytes()
    assert not re.search(r'(src|href)="https?:', page) and "<script" not in page
    assert "0.5 before, 0.8 after" in page
    assert page.count("<tr>") == 1 + len(evals) + 1 + len(steps)  # two tables, each with its header row
    assert "Every step (40)" in render_html(summary, steps, evals, b"")


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    paths = write_run_report(tmp_path, {"command": "grpo", "task": "t", "steps": 30}, policy_steps(), [])
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(paths["html"].resolve().as_uri(), wait_until="load")
            image = page.locator("img#curves")
            assert image.is_visible() and image.evaluate("img => img.complete && img.naturalWidth") > 500
            assert distinct_colours(image.screenshot()) > 20
            assert page.locator("table#steps tbody tr").count() == 30
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        finally:
            browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
