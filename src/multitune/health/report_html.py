"""The HTML page of ``multitune monitor``: one card per task, in one self-contained file.

Inline CSS, no scripts, no external requests (as compare's report: it can be mailed or archived as is).
Label distributions are drawn as CSS bars, so no plotting library is needed. Every string that comes from
the user (task names, paths, labels, reasons) is escaped.
"""

from __future__ import annotations

import html
import math
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222;
  padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin: 0 0 .5rem; }
.meta { color: #555; margin-bottom: 1.5rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1rem; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 1rem; background: #fff; }
.card.alarm { border-color: #c0392b; box-shadow: 0 0 0 2px #f5c6c0; }
.verdict { font-weight: 600; } .alarm .verdict { color: #c0392b; } .ok .verdict { color: #1e7e34; }
.muted .verdict { color: #777; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; font-size: .9rem; }
th, td { text-align: left; padding: .2rem .4rem; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { height: .7rem; background: #3b6fb6; display: inline-block; vertical-align: middle; }
.bar.live { background: #e08a2e; }
.legend span { display: inline-block; width: .8rem; height: .8rem; vertical-align: middle;
  margin: 0 .2rem 0 .6rem; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and value != 0 and abs(value) < 10**-digits:
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _tests(tests: dict[str, dict[str, float]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td class='num'>{_num(t.get('statistic'), 4)}</td>"
        f"<td class='num'>{_num(t.get('p_value'), 4)}</td></tr>"
        for name, t in tests.items()
    )
    return f"<table><tr><th>test</th><th>statistic</th><th>p-value</th></tr>{rows}</table>"


def _labels(distribution: dict[str, dict[str, float]]) -> str:
    reference, live = distribution.get("reference", {}), distribution.get("live", {})
    rows = []
    for label in list(reference)[:30]:  # 77 intents would drown the card: the first 30
        ref, now = float(reference.get(label, 0.0)), float(live.get(label, 0.0))
        rows.append(
            f"<tr><td>{_e(label)}</td><td><span class='bar' style='width:{120 * ref:.1f}px'></span> "
            f"{ref:.2f}<br>"
            f"<span class='bar live' style='width:{120 * now:.1f}px'></span> {now:.2f}</td></tr>"
        )
    legend = (
        "<div class='legend'><span style='background:#3b6fb6'></span>reference"
        "<span style='background:#e08a2e'></span>new data</div>"
    )
    return f"{legend}<table><tr><th>label</th><th>share of predictions</th></tr>{''.join(rows)}</table>"


def _card(name: str, task: dict[str, Any]) -> str:
    if not task.get("monitored"):
        return (
            f"<div class='card muted'><h2>{_e(name)}</h2><p class='verdict'>not monitored</p>"
            f"<p>{_e(task.get('reason', ''))}</p></div>"
        )
    drift = task["drift"]
    state = "alarm" if drift["alarm"] else "ok"
    verdict = "drift detected" if drift["alarm"] else "no drift"
    facts = [
        ("rows", task.get("rows")),
        ("family p-value (Bonferroni)", _num(drift.get("p_value"), 4)),
        ("score (-log10 p; alarm at)", f"{_num(drift.get('score'), 2)} ({_num(drift.get('threshold'), 2)})"),
        ("estimated accuracy (label-free)", _num(task.get("estimated_accuracy"))),
        ("reference accuracy", _num(task.get("reference_accuracy"))),
    ]
    if task.get("accuracy") is not None:
        facts.append(
            (f"accuracy on the file's labels ({task.get('labelled_rows')} rows)", _num(task["accuracy"]))
        )
    length, unknown = task.get("length", {}), task.get("unknown_rate", {})
    facts.append(
        (
            "mean tokens (reference / new)",
            f"{_num(length.get('reference_mean'), 1)} / {_num(length.get('live_mean'), 1)}",
        )
    )
    facts.append(
        (
            "unknown-token rate (reference / new)",
            f"{_num(unknown.get('reference'), 4)} / {_num(unknown.get('live'), 4)}",
        )
    )
    table = "".join(f"<tr><td>{_e(k)}</td><td class='num'>{_e(v)}</td></tr>" for k, v in facts)
    labels = _labels(task["label_distribution"]) if "label_distribution" in task else ""
    return (
        f"<div class='card {state}'><h2>{_e(name)}</h2><p class='verdict'>{verdict}</p>"
        f"<table>{table}</table>{_tests(drift.get('tests', {}))}{labels}</div>"
    )


def render(report: dict[str, Any]) -> str:
    """The whole page of a report (the dict :func:`multitune.health.offline.monitor_file` writes as JSON)."""
    tasks = report.get("tasks", {})
    alarms = sum(1 for t in tasks.values() if t.get("monitored") and t["drift"]["alarm"])
    cards = "".join(_card(name, task) for name, task in tasks.items())
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>multitune monitor: {_e(report.get('data', ''))}</title><style>{STYLE}</style></head><body>"
        f"<h1>Drift report</h1><p class='meta'>{_e(report.get('data', ''))} against the profiles of "
        f"{_e(report.get('source', ''))}: {len(tasks)} task(s), {alarms} with drift (alpha "
        f"{_e(report.get('alpha', ''))} per task, Bonferroni over its tests)</p>"
        f"<div class='cards'>{cards}</div></body></html>"
    )
