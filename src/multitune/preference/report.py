"""The run report of ``reward``, ``dpo``, ``kto``, ``ppo`` and ``grpo``: ``curves.png`` and ``report.html``.

One figure of the curves a reader of a preference run looks at first (TRL's logged statistics): the mean reward
of each step's responses with its spread, the KL to the reference, entropy, clip fraction, the losses, the
held-out accuracy, margin and loss over the evaluations, the response length. A panel is drawn only when the
run logged its statistic, so one function serves the pair commands (training steps and held-out evaluations)
and the policy commands (one record per rollout step). ``report.html`` is one self-contained file, as compare's
report (inline CSS, the figure as a ``data:`` URI, no scripts): the run's summary, the figure, the evaluations
and every step's record. Drawn with matplotlib's Agg canvas (compare/plots.py's ``_figure``).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitune.compare.plots import COLORS, _figure, _png
from multitune.compare.report import CSS

CURVES, REPORT = "curves.png", "report.html"
STEPS, EVALS = "steps", "evals"
SOURCE = {STEPS: "training steps", EVALS: "held-out"}

# (title, [(source, key, label)], the keys of a +-1 sd band around the first series, the first logged)
PANELS: list[tuple[str, list[tuple[str, str, str]], str | None]] = [
    (
        "Reward (mean of the step's responses)",
        [(STEPS, "score", "mean reward")],
        "score_std,score_std_in_group",
    ),
    ("PPO's reward (score - KL penalty)", [(STEPS, "reward", "reward")], None),
    ("KL to the reference", [(STEPS, "kl", "kl"), (STEPS, "approx_kl", "approx. KL old -> new")], None),
    ("Entropy (nats per token)", [(STEPS, "entropy", "entropy")], None),
    ("Clip fraction", [(STEPS, "clip_fraction", "clip fraction")], None),
    (
        "Losses",
        [
            (STEPS, "loss", "training loss"),
            (STEPS, "policy_loss", "policy loss"),
            (STEPS, "value_loss", "value loss"),
            (EVALS, "loss", "held-out loss"),
        ],
        None,
    ),
    ("Accuracy", [(EVALS, "accuracy", "held-out"), (STEPS, "accuracy", "training batches")], None),
    ("Margin", [(EVALS, "margin", "held-out"), (STEPS, "margin", "training batches")], None),
    ("KTO's reference point z0", [(STEPS, "z0", "z0")], None),
    ("Response length (tokens)", [(STEPS, "response_length", "mean length")], None),
]

# what the summary's header shows, when the run's result.json has it
HEADER = [
    ("Command", "command"),
    ("Task", "task"),
    ("Method", "method"),
    ("Model", "model"),
    ("Quantized base", "quantize"),
    ("Reward", "reward_source"),
    ("Loss", "loss"),
    ("Beta", "beta"),
    ("Reference", "reference"),
    ("Trainable parameters", "trainable_parameters"),
    ("Steps", "steps"),
    ("Best step", "best_step"),
    ("Seconds", "seconds"),
    ("Mean reward, first steps", "score_first"),
    ("Mean reward, last steps", "score_last"),
    ("KL at the end", "kl_last"),
    ("Held-out pair accuracy", "validation_pair_accuracy"),
]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a finite ``key``."""
    xs, ys = [], []
    for i, record in enumerate(records):
        value = _number(record.get(key))
        if value is not None:
            step = _number(record.get("step"))
            xs.append(step if step is not None else float(i + 1))
            ys.append(value)
    return xs, ys


def _smooth(values: list[float]) -> list[float]:
    """A trailing moving average over a twentieth of the run (noisy per-batch statistics read as a trend)."""
    window = max(1, len(values) // 20)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _panels(steps: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> list[tuple[str, list, Any]]:
    """The panels with data: (title, [(label, xs, ys, is_step_series)], band or None)."""
    records = {STEPS: steps, EVALS: evals}
    drawn = []
    for title, series, band_key in PANELS:
        lines = []
        for source, key, label in series:
            xs, ys = _series(records[source], key)
            if xs:
                lines.append((label, xs, ys, source == STEPS))
        if not lines:
            continue
        band = None
        for key in band_key.split(",") if band_key else ():  # the first spread the run logged, if any
            bx, spread = _series(steps, key)
            if bx and bx == lines[0][1]:
                band = spread
                break
        drawn.append((title, lines, band))
    return drawn


def plot_curves(steps: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> bytes:
    """The run's curves as PNG bytes: one panel per statistic the run logged (three columns)."""
    panels = _panels(steps, evals)
    columns = 3 if len(panels) > 2 else max(1, len(panels))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = _figure(4.2 * columns, 3.0 * rows)
    if not panels:
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no steps were logged", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
    for index, (title, lines, band) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for number, (label, xs, ys, per_step) in enumerate(lines):
            color = COLORS[number % len(COLORS)]
            if per_step and len(ys) > 20:  # the raw statistic faint, its trend drawn over it
                axes.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                axes.plot(xs, _smooth(ys), color=color, linewidth=1.6, label=f"{label} (moving mean)")
            else:
                axes.plot(xs, ys, color=color, linewidth=1.6, marker="o" if not per_step else None,
                          markersize=3, label=label)  # fmt: skip
            if band is not None and number == 0:
                low = [y - s for y, s in zip(ys, band, strict=True)]
                high = [y + s for y, s in zip(ys, band, strict=True)]
                axes.fill_between(xs, low, high, color=color, alpha=0.15, label="+-1 sd")
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if len(lines) > 1 or band is not None:
            axes.legend(fontsize=7)
    return _png(figure)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "n/a" if value is None else _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{number:.4g}"


def _table(records: Sequence[dict[str, Any]], table_id: str) -> list[str]:
    """Every record as a row; the columns are the union of their keys, in first-seen order."""
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns and not isinstance(record[k], dict | list)]
    out = [f'<div class="scroll"><table id="{table_id}"><thead><tr>']
    out += [f'<th scope="col">{_e(c)}</th>' for c in columns]
    out.append("</tr></thead><tbody>")
    for record in records:
        out.append("<tr>" + "".join(f"<td>{_cell(record.get(c))}</td>" for c in columns) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def render_html(
    summary: dict[str, Any], steps: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], png: bytes
) -> str:
    command = summary.get("command") or "run"
    title = f"multitune {command}: {summary.get('task') or 'n/a'}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body><main>",
        f"<h1>{_e(title)}</h1>",
        '<dl class="meta">',
    ]
    for label, key in HEADER:
        if summary.get(key) is not None:
            out.append(f"<dt>{_e(label)}</dt><dd>{_cell(summary[key])}</dd>")
    for name in ("preference_accuracy", "accuracy", "margin"):
        value = summary.get(name)
        if isinstance(value, dict) and "before" in value:
            out.append(
                f"<dt>{_e(name.replace('_', ' ').capitalize())}</dt>"
                f"<dd>{_cell(value.get('before'))} before, {_cell(value.get('after'))} after</dd>"
            )
    data = base64.b64encode(png).decode("ascii")
    out += [
        "</dl>",
        "<h2>Curves</h2>",
        f'<figure><img class="plot" id="curves" src="data:image/png;base64,{data}" '
        f'alt="{_e(title)}: the curves of each logged statistic over the steps"></figure>',
    ]
    if evals:
        out += ["<h2>Held-out evaluations</h2>", *_table(evals, "evals")]
    if steps:
        out += [
            f"<details><summary>Every step ({len(steps)})</summary>",
            *_table(steps, "steps"),
            "</details>",
        ]
    out += ["</main></body></html>", ""]
    return "\n".join(out)


def write_run_report(
    folder: str | Path,
    summary: dict[str, Any],
    steps: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]] = (),
) -> dict[str, Path]:
    """FOLDER/curves.png and FOLDER/report.html (each written atomically); returns their paths."""
    from multitune.storage import write_bytes_atomic

    folder = Path(folder)
    png = plot_curves(steps, evals)
    paths = {"png": folder / CURVES, "html": folder / REPORT}
    write_bytes_atomic(paths["png"], png)
    write_bytes_atomic(paths["html"], render_html(summary, steps, evals, png).encode("utf-8"))
    return paths
