"""The report of ``multitune compare``: one table, a few facts read from it, three plots.

:func:`write_report` turns the per-method results of a comparison into ``report.md`` (plots embedded by
relative path), ``report.html`` (one self-contained file: inline CSS, plots as ``data:`` URIs, no scripts, no
external requests, so it can be mailed or archived as is) and ``plots/*.png``.

Results come from files written by earlier (possibly older or interrupted) runs, so every field is optional:
a missing, null or NaN value is shown as ``n/a`` and a sentence or plot point that needs it is skipped.
Every user string (method names, paths, the command, settings) is escaped before it reaches HTML.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitune.compare.plots import PLOT_NAMES, plot_memory, plot_quality_vs_parameters, plot_quality_vs_time
from multitune.compare.table import (
    NA,
    Row,
    audited,
    best_rows,
    count_text,
    has_dp,
    has_general,
    has_seeds,
    main_metric,
    num,
    reading,
    seconds_text,
    table_columns,
)

PLOTS = "plots"


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader never sees half a file, and the file gets the umask's mode (not mkstemp's 0600)."""
    from multitune.storage import write_bytes_atomic

    write_bytes_atomic(path, data)


def _header(meta: dict[str, Any], metric: str, higher: bool) -> list[tuple[str, str]]:
    """(label, plain-text value) pairs for the report's header."""
    examples = meta.get("examples")
    if isinstance(examples, dict) and examples:
        example_text = ", ".join(f"{count_text(examples.get(k))} {k}" for k in examples)
    else:
        example_text = NA

    def text(key: str) -> str:
        value = meta.get(key)
        return NA if value is None or value == "" else str(value)

    return [
        ("Model", text("model")),
        ("Data", text("data")),
        ("Task", text("task")),
        ("Kind", text("kind")),
        ("Examples", example_text),
        ("Trials per method", text("trials")),
        *(
            [("Seeds per method", text("seeds"))]
            if isinstance(meta.get("seeds"), int) and meta["seeds"] > 1
            else []
        ),
        ("Device", text("device")),
        ("Wall time", seconds_text(meta.get("wall_seconds"))),
        ("Started", text("started")),
        ("Metric", f"{metric} ({'higher' if higher else 'lower'} is better)"),
        *([("General text", text("general_data"))] if meta.get("general_data") else []),
    ]


def _md_cell(text: str) -> str:
    """A table cell for Markdown: no raw HTML, no column breaks, one line."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def _markdown(
    rows: Sequence[Row], meta: dict[str, Any], metric: str, higher: bool, best: set[int], facts: list[str]
) -> str:
    lines = [f"# multitune compare: {_md_cell(str(meta.get('task') or NA))}", ""]
    for label, value in _header(meta, metric, higher):
        lines.append(f"- **{label}**: {_md_cell(value)}")
    command = meta.get("command")
    if command:
        lines += ["", "Command:", "", "```", str(command).replace("```", "` ` `"), "```"]
    columns = _columns(rows, meta, metric, higher)
    lines += [
        "",
        "## Comparison",
        "",
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for i, row in enumerate(rows):
        cells = row.cells()
        values = [_md_cell(cells[key]) for key, _ in columns]
        if i in best:
            values[[k for k, _ in columns].index("test")] = (
                f"**{values[[k for k, _ in columns].index('test')]}**"
            )
        lines.append("| " + " | ".join(values) + " |")
    lines += [
        "",
        _md_cell(_note(rows, metric, meta)),
        "",
        "## Reading the table",
        "",
    ]
    lines += [f"- {_md_cell(fact)}" for fact in facts] or ["- No numbers to compare."]
    lines += ["", "## Plots", ""]
    for name, title in _plot_titles(metric).items():
        lines += [f"![{title}]({PLOTS}/{name}.png)", ""]
    return "\n".join(lines)


def _columns(rows: Sequence[Row], meta: dict[str, Any], metric: str, higher: bool) -> list[tuple[str, str]]:
    return table_columns(
        metric, higher, has_seeds(rows), has_general(rows), _general_base(meta), audit=audited(rows),
        generation=meta.get("kind") == "generation", dp=has_dp(rows),
    )  # fmt: skip


def _general_base(meta: dict[str, Any]) -> float | None:
    return num(meta.get("general_perplexity_base"))


def _note(rows: Sequence[Row], metric: str, meta: dict[str, Any] | None = None) -> str:
    """The note under the table (plain text): what bold, storage and latency mean, and the cells only some
    tables have."""
    text = (
        f"Best test {metric} in bold. Storage for 100 tasks is the base model plus 100 stored adapters; for full "
        "fine-tuning it is 100 whole models. Latency is per example, one at a time; in brackets, examples per "
        "second when batched."
    )
    if any(not r.learned for r in rows):
        text += (
            ' "did not learn": the method\'s run predicts one label or its loss stayed at the chance level, so its '
            "score (in brackets) is not its quality; it is never bold or ranked (why: Reading the table)."
        )
    if has_seeds(rows):
        text += (
            f" Over seeds: the test {metric} of the chosen settings trained with each seed, as the mean ± the "
            "sample standard deviation, and the lowest and highest."
        )
    if has_general(rows):
        text += (
            " General-text perplexity: plain general text (no prompt, no template) scored through the method's "
            "trained task, against the bare base in the column's title; a rise is general ability the method lost."
        )
    if audited(rows):
        text += (
            " Bias audit: every test row that mentions a term of the attribute's lexicon (he/she, names, ...) is "
            "rewritten with each counterpart; "
            + (
                "the mean change in the log-probability of the row's own response"
                if (meta or {}).get("kind") == "generation"
                else "the flip rate is the share of a row's rewrites whose predicted label changes, averaged over "
                "the rows tested"
            )
            + ', with a bootstrap 95% interval; "no rows mention" means nothing was measured (not 0%).'
        )
    refused = (meta or {}).get("dp_refused")
    if has_dp(rows) or refused:
        text += (
            " DP: the epsilon each DP-SGD run spent at its delta (privacy accounted with Opacus), and the noise "
            "multiplier of its per-sample-clipped gradients."
        )
    if isinstance(refused, dict) and refused:
        text += (
            " Not trainable under --dp-epsilon, so not compared: "
            + "; ".join(f"{m} ({str(reason).split('; use ')[0]})" for m, reason in refused.items())
            + "."
        )
    return text


def _plot_titles(metric: str) -> dict[str, str]:
    return {
        "quality_vs_parameters": f"Test {metric} against trainable parameters (log scale)",
        "quality_vs_time": f"Test {metric} against training time",
        "memory": "Peak memory per method (MB)",
    }


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1d1d1f; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 1.6rem; margin: 0 0 12px; }
h2 { font-size: 1.2rem; margin: 28px 0 10px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0;
          background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 12px 16px; }
dl.meta dt { font-weight: 600; color: #4a4f57; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.85rem; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; }
.scroll { overflow-x: auto; background: #fff; border: 1px solid #dde1e6; border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 0.86rem; }
th, td { padding: 7px 9px; border-bottom: 1px solid #e6e8eb; text-align: right; vertical-align: top;
         white-space: nowrap; font-variant-numeric: tabular-nums; }
thead th { background: #eef1f5; font-weight: 600; text-align: center; vertical-align: bottom;
           white-space: normal; }
tbody th { text-align: left; font-weight: 600; }
td.settings { text-align: left; white-space: normal; min-width: 9em; max-width: 16em; }
.detail { color: #5f6670; font-size: 0.92em; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #f0f5ff; }
td strong, td strong .detail { color: #0a5c1e; }
p.note { color: #555b63; font-size: 0.85rem; margin: 8px 2px; }
ul.facts { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 12px 16px 12px 34px;
           margin: 0; }
ul.facts li { margin: 3px 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 8px; }
img.plot { display: block; width: 100%; max-width: 800px; height: auto; margin: 0 auto; }
"""


def e(value: Any) -> str:
    """Any value as HTML text, quotes included, so it is safe in element text and attribute values alike."""
    return html.escape(str(value), quote=True)


def _html(
    rows: Sequence[Row],
    meta: dict[str, Any],
    metric: str,
    higher: bool,
    best: set[int],
    facts: list[str],
    pngs: dict[str, bytes],
) -> str:
    title = f"multitune compare: {meta.get('task') or NA}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{e(title)}</h1>",
        '<dl class="meta">',
    ]
    for label, value in _header(meta, metric, higher):
        out.append(f"<dt>{e(label)}</dt><dd>{e(value)}</dd>")
    if meta.get("command"):
        out.append(f"<dt>Command</dt><dd><pre><code>{e(meta['command'])}</code></pre></dd>")
    out += ["</dl>", "<h2>Comparison</h2>", '<div class="scroll">', '<table id="comparison">', "<thead><tr>"]
    columns = _columns(rows, meta, metric, higher)
    out += [f'<th scope="col">{e(t)}</th>' for _, t in columns]
    out += ["</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        out.append("<tr>")
        parts = row.parts()
        for key, _ in columns:
            main, detail = parts[key]
            value = e(main) + (f'<br><span class="detail">{e(detail)}</span>' if detail else "")
            if key == "test" and i in best:
                value = f"<strong>{value}</strong>"
            if key == "method":
                out.append(f'<th scope="row">{value}</th>')
            else:
                out.append(f'<td class="{key}">{value}</td>')
        out.append("</tr>")
    out += [
        "</tbody>",
        "</table>",
        "</div>",
        f'<p class="note">{e(_note(rows, metric, meta))}</p>',
        "<h2>Reading the table</h2>",
        '<ul class="facts">',
    ]
    out += [f"<li>{e(fact)}</li>" for fact in facts] or ["<li>No numbers to compare.</li>"]
    out += ["</ul>", "<h2>Plots</h2>", '<div class="plots">']
    for name, caption in _plot_titles(metric).items():
        data = base64.b64encode(pngs[name]).decode("ascii")
        out.append(
            f'<figure><img class="plot" id="plot-{name}" src="data:image/png;base64,{data}" '
            f'alt="{e(caption)}"></figure>'
        )
    out += ["</div>", "</main>", "</body>", "</html>", ""]
    return "\n".join(out)


def write_report(folder: str | Path, results: list[dict], meta: dict) -> dict[str, Path]:
    """Writes FOLDER/report.md, FOLDER/report.html (self-contained) and FOLDER/plots/*.png; returns their paths
    keyed 'md', 'html', 'quality_vs_parameters', 'quality_vs_time', 'memory'."""
    folder = Path(folder)
    (folder / PLOTS).mkdir(parents=True, exist_ok=True)
    meta = meta if isinstance(meta, dict) else {}
    results = [r for r in results if isinstance(r, dict)]
    metric, higher = main_metric(results, meta)
    rows = [Row(r, metric) for r in results]
    best = best_rows(rows, higher)
    facts = reading(rows, metric, higher, _general_base(meta))
    pngs = {
        "quality_vs_parameters": plot_quality_vs_parameters(rows, metric, higher),
        "quality_vs_time": plot_quality_vs_time(rows, metric, higher),
        "memory": plot_memory(rows),
    }
    paths: dict[str, Path] = {}
    for name in PLOT_NAMES:
        paths[name] = folder / PLOTS / f"{name}.png"
        _write_atomic(paths[name], pngs[name])
    paths["md"] = folder / "report.md"
    _write_atomic(paths["md"], _markdown(rows, meta, metric, higher, best, facts).encode("utf-8"))
    paths["html"] = folder / "report.html"
    _write_atomic(paths["html"], _html(rows, meta, metric, higher, best, facts, pngs).encode("utf-8"))
    return {key: paths[key] for key in ("md", "html", *PLOT_NAMES)}
