"""The comparison's three plots (quality against trainable parameters and against training time, peak
memory) as PNG bytes, drawn with matplotlib's Agg backend; labels moved apart so that none overlaps another.

A method that did not learn is drawn hollow, without an error bar, its label saying so: its score is the label
prior's, not a quality to read off the axis."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from multitune.compare.table import NA, Row, compact, seconds_text, short

PLOT_NAMES = ("quality_vs_parameters", "quality_vs_time", "memory")
DPI = 110
COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]  # 11 against 10 colours: no two alike


def _figure(width: float = 7.2, height: float = 4.6) -> Any:
    """A figure on the Agg canvas, made without pyplot: no global backend switch, no figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any, axes: Any = None, labels: Sequence[tuple[Any, float, float]] = ()) -> bytes:
    """The figure as PNG bytes, laid out first, then its point labels moved apart."""
    buffer = io.BytesIO()
    figure.tight_layout()
    if labels:
        _untangle(axes, list(labels))
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def _style(index: int) -> tuple[str, str]:
    return COLORS[index % len(COLORS)], MARKERS[index % len(MARKERS)]


def _no_data(axes: Any, what: str) -> None:
    axes.text(
        0.5,
        0.5,
        f"no {what} to plot",
        ha="center",
        va="center",
        transform=axes.transAxes,
        fontsize=12,
        color="#666666",
    )
    axes.set_xticks([])
    axes.set_yticks([])


def _quality_axis(axes: Any, metric: str, higher: bool) -> None:
    axes.set_ylabel(f"test {metric} ({'higher' if higher else 'lower'} is better)", fontsize=11)
    axes.grid(True, which="major", alpha=0.3)


Point = tuple[
    int, float, float, tuple[float, float] | None, str, bool
]  # index, x, y, interval, label, learned


def _point(index: int, row: Row, x: float, label: str) -> Point:
    """A row's point; one that did not learn keeps its place but no interval, and its label says so."""
    if not row.learned:
        return (index, x, row.test or 0.0, None, f"{label} (did not learn)", False)
    return (index, x, row.test or 0.0, row.ci, label, True)


def _scatter(axes: Any, points: list[Point]) -> list[Any]:
    """Each point with its error bar (from the interval) and its label; colour and marker follow the method,
    hollow for one that did not learn. Returns (label, lowest y, highest y) per point, to untangle the labels
    once the axes are final."""
    labels = []
    for index, x, y, ci, label, learned in points:
        color, marker = _style(index)
        yerr = None if ci is None else [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
        axes.errorbar(
            [x],
            [y],
            yerr=yerr,
            fmt=marker,
            color=color,
            markersize=9,
            capsize=4,
            elinewidth=1.4,
            markeredgecolor="black" if learned else color,
            markerfacecolor=color if learned else "white",
            markeredgewidth=0.6 if learned else 1.8,
        )
        text = axes.annotate(
            label, (x, y), textcoords="offset points", xytext=(8, 6), fontsize=10, color="#222222"
        )
        text.set_in_layout(False)
        labels.append(
            (text, ci[0] if ci else y, ci[1] if ci else y)
        )  # the layout is made for the axes; labels are then kept inside them
    axes.margins(y=0.12)
    return labels


# Where a label may sit around its point (offset in points, horizontal alignment), in order of preference.
LABEL_SPOTS = [
    ((9, 4), "left"),
    ((9, -14), "left"),
    ((-9, 4), "right"),
    ((-9, -14), "right"),
    ((9, 18), "left"),
    ((9, -28), "left"),
    ((-9, 18), "right"),
    ((-9, -28), "right"),
    ((9, 32), "left"),
    ((9, -42), "left"),
    ((-9, 32), "right"),
    ((-9, -42), "right"),
]


def _untangle(axes: Any, labels: list[tuple[Any, float, float]]) -> None:
    """Move each label to the first spot that covers no earlier label, no point or error bar, and stays inside
    the axes (else to the spot that overlaps least)."""
    from matplotlib.transforms import Bbox

    renderer = axes.figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    placed: list[Any] = []
    for text, lo, hi in labels:  # points and their error bars, in pixels
        (x, y0), (_, y1) = axes.transData.transform([(text.xy[0], lo), (text.xy[0], hi)])
        placed.append(Bbox([[x - 7, min(y0, y1) - 7], [x + 7, max(y0, y1) + 7]]))
    for text, _, _ in sorted(labels, key=lambda item: item[0].xy):
        best, best_cost = LABEL_SPOTS[0], math.inf
        for offset, align in LABEL_SPOTS:
            text.set_position(offset)
            text.set_horizontalalignment(align)
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in placed)
            cost += box.width * box.height - _overlap(box, frame)  # the part outside the axes
            if cost < best_cost:
                best, best_cost = (offset, align), cost
            if cost == 0:
                break
        text.set_position(best[0])
        text.set_horizontalalignment(best[1])
        placed.append(text.get_window_extent(renderer))


def _overlap(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, width) * max(0.0, height)


def _pad_log(axes: Any, xs: list[float]) -> None:
    lo, hi = min(xs), max(xs)
    axes.set_xlim(lo / 3, hi * 3)


def plot_quality_vs_parameters(rows: Sequence[Row], metric: str, higher: bool) -> bytes:
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    points = []
    for i, r in enumerate(rows):
        if r.test is None or r.parameters is None:
            continue
        x = max(r.parameters, 1.0)
        label = (
            f"{r.method}: 0 (no training)" if r.parameters == 0 else f"{r.method}: {compact(r.parameters)}"
        )
        points.append(_point(i, r, x, label))
    axes.set_title(f"Test {metric} against trainable parameters", fontsize=12)
    if not points:
        _no_data(axes, "methods with both a test score and a parameter count")
        return _png(figure)
    labels = _scatter(axes, points)
    axes.set_xscale("log")
    _pad_log(axes, [p[1] for p in points])
    axes.set_xlabel("trainable parameters (log scale; 0 drawn at 1)", fontsize=11)
    _quality_axis(axes, metric, higher)
    return _png(figure, axes, labels)


def plot_quality_vs_time(rows: Sequence[Row], metric: str, higher: bool) -> bytes:
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    usable = [(i, r) for i, r in enumerate(rows) if r.test is not None and r.seconds is not None]
    axes.set_title(f"Test {metric} against training time", fontsize=12)
    if not usable:
        _no_data(axes, "methods with both a test score and a training time")
        return _png(figure)
    positive = [r.seconds for _, r in usable if r.seconds and r.seconds > 0]
    log = len(positive) > 1 and max(positive) / min(positive) > 10
    floor = min(positive) / 3 if positive else 0.0
    points = []
    for i, r in usable:
        seconds = r.seconds or 0.0
        x = seconds if not log or seconds > 0 else floor
        label = (
            f"{r.method}: no training"
            if r.untrained and seconds == 0
            else f"{r.method}: {seconds_text(seconds)}"
        )
        points.append(_point(i, r, x, label))
    labels = _scatter(axes, points)
    if log:
        axes.set_xscale("log")
        _pad_log(axes, [p[1] for p in points])
        zero = any(not r.seconds for _, r in usable)
        axes.set_xlabel(
            "training time, seconds (log scale" + ("; 0 s drawn at the left)" if zero else ")"), fontsize=11
        )
    else:
        hi = max(max(p[1] for p in points), 1.0)
        axes.set_xlim(-0.05 * hi, hi * 1.35)
        axes.set_xlabel("training time, seconds", fontsize=11)
    _quality_axis(axes, metric, higher)
    return _png(figure, axes, labels)


def plot_memory(rows: Sequence[Row]) -> bytes:
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    usable = [(i, r) for i, r in enumerate(rows) if r.memory is not None]
    kinds = sorted({r.memory_kind for _, r in usable if r.memory_kind})
    what = {"rss": "peak resident set (CPU)", "cuda": "CUDA allocator peak"}
    axes.set_title(
        "Peak memory while training" + (f": {what.get(kinds[0], kinds[0])}" if len(kinds) == 1 else ""),
        fontsize=12,
    )
    if not usable:
        _no_data(axes, "memory measurements")
        return _png(figure)
    labels = [r.method if len(kinds) < 2 else f"{r.method}\n({r.memory_kind or NA})" for _, r in usable]
    values = [(r.memory or 0.0) / 1e6 for _, r in usable]
    bars = axes.bar(
        range(len(usable)), values, color=[_style(i)[0] for i, _ in usable], edgecolor="black", linewidth=0.6
    )
    for bar, value in zip(bars, values, strict=True):
        axes.annotate(
            f"{short(value)} MB",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=10,
        )
    axes.set_xticks(range(len(usable)))
    axes.set_xticklabels(labels, fontsize=10, rotation=0 if len(usable) <= 6 else 30)
    axes.set_ylabel("peak memory (MB)", fontsize=11)
    axes.set_ylim(0, max(values) * 1.15 + 1e-9)
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


# ---- writing -------------------------------------------------------------------------------------------
