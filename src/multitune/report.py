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
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NA = "n/a"
PLOTS = "plots"
PLOT_NAMES = ("quality_vs_parameters", "quality_vs_time", "memory")
LOWER_IS_BETTER = ("loss", "perplexity")
DPI = 110
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]  # 11 against 10 colours: no two alike


# ---- small formatters: every one takes anything and answers "n/a" for what it cannot read ----------------
def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, null, NaN, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, or None where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def human_bytes(value: Any) -> str:
    """Decimal units, three significant digits at most: 301234 -> '301 kB', 9026458400 -> '9.0 GB'."""
    n = _num(value)
    if n is None or n < 0:
        return NA
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 999.5 or unit == "PB":
            return f"{n:.1f} {unit}" if n < 9.95 else f"{n:.0f} {unit}"
    return NA  # unreachable


def _percent(value: Any) -> str:
    p = _num(value)
    if p is None:
        return NA
    if p == 0:
        return "0%"
    if p >= 9.95:
        return f"{p:.0f}%"
    if p >= 1:
        return f"{p:.1f}%"
    return f"{p:.2g}%"


def _count(value: Any) -> str:
    n = _num(value)
    return NA if n is None else f"{n:,.0f}"


def _compact(n: float) -> str:
    """A count for a plot label: 74498 -> '74.5k', 22713218 -> '22.7M'."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:.0f}"


def _seconds(value: Any) -> str:
    s = _num(value)
    if s is None:
        return NA
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _short(value: float) -> str:
    """A number in at most three significant digits, without exponent noise: 250.0 -> '250', 8.123 -> '8.12'."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _metric(value: Any) -> str:
    v = _num(value)
    return NA if v is None else f"{v:.3f}"


def _interval(ci: Any) -> tuple[float, float] | None:
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    lo, hi = _num(ci[0]), _num(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def _param_value(value: Any) -> str:
    v = _num(value)
    if v is None or isinstance(value, int):
        return str(value)
    if v != 0 and abs(v) < 0.01:
        mantissa, exponent = f"{v:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{v:.3g}"


def describe_params(params: Any) -> str:
    """Compact settings: {'learning_rate': 0.002, 'lora.rank': 8, 'epochs': 2} -> 'lr 2e-3, rank 8, 2 epochs'."""
    if not isinstance(params, dict) or not params:
        return NA
    parts = []
    for key, value in params.items():
        name = str(key).split(".", 1)[-1]
        name = {"learning_rate": "lr", "num_virtual_tokens": "tokens", "reduction_factor": "factor"}.get(name, name)
        if name == "epochs" and _num(value) is not None:
            parts.append(f"{_param_value(value)} epoch{'' if value == 1 else 's'}")
        else:
            parts.append(f"{name} {_param_value(value)}")
    return ", ".join(parts)


# ---- what the table shows ------------------------------------------------------------------------------
def _main_metric(results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, bool]:
    """(metric, higher is better): the meta's, else the first result's; direction from the name if absent."""
    metric = meta.get("metric") if isinstance(meta.get("metric"), str) else None
    for result in results:
        if metric is None and isinstance(result.get("metric"), str):
            metric = result["metric"]
    metric = metric or "accuracy"
    higher = meta.get("higher_is_better")
    if not isinstance(higher, bool):
        higher = next((r["higher_is_better"] for r in results if isinstance(r.get("higher_is_better"), bool)
                       and r.get("metric") == metric), metric not in LOWER_IS_BETTER)
    return metric, higher


def _storage_100(result: dict[str, Any]) -> float | None:
    """Bytes for 100 tasks: as measured, else base + 100 x stored (for full, base is 0: each task a model)."""
    given = _num(result.get("storage_100_tasks_bytes"))
    if given is not None:
        return given
    base, stored = _num(result.get("base_bytes")), _num(result.get("stored_bytes"))
    return None if base is None or stored is None else base + 100 * stored


class Row:
    """One method's numbers, read once, tolerant of anything missing."""

    def __init__(self, result: dict[str, Any], metric: str) -> None:
        self.result = result
        self.method = str(result.get("method") or result.get("task") or NA)
        self.test = _num(_get(result, "test", metric))
        self.ci = _interval(_get(result, "test_ci", metric))
        self.validation = _num(_get(result, "validation", metric))
        self.parameters = _num(result.get("trainable_parameters"))
        self.percent = _num(result.get("trainable_percent"))
        self.stored = _num(result.get("stored_bytes"))
        self.storage_100 = _storage_100(result)
        self.memory = _num(result.get("peak_memory_bytes"))
        kind = result.get("memory_kind")
        self.memory_kind = kind if isinstance(kind, str) else None
        self.seconds = _num(result.get("train_seconds"))
        self.steps = _num(result.get("steps"))
        self.latency = _num(result.get("latency_ms"))
        self.throughput = _num(result.get("throughput_per_s"))
        self.examples = _num(result.get("test_examples"))
        self.is_full = self.method == "full" or _num(result.get("base_bytes")) == 0
        self.untrained = self.parameters == 0 or self.steps == 0

    @property
    def name(self) -> str:
        """The method as a sentence names it."""
        return "full fine-tuning" if self.method == "full" else self.method

    def parts(self) -> dict[str, tuple[str, str]]:
        """Plain-text cells (not escaped) keyed by column, each as (main value, detail or "")."""
        r = self.result
        parameters = (_count(self.parameters), _percent(self.percent) if self.percent is not None else "")
        if self.parameters == 0:
            parameters = ("0", "no training")
        storage = (human_bytes(self.storage_100), "100 models" if self.storage_100 is not None and self.is_full else "")
        memory = (human_bytes(self.memory), (self.memory_kind or "") if self.memory is not None else "")
        training = (_seconds(self.seconds), "")
        if self.steps is not None:
            steps = int(self.steps)
            if steps == 0:
                training = ("no training", "") if not self.seconds else (training[0], "no training")
            else:
                training = (training[0], f"{steps:,} step{'' if steps == 1 else 's'}")
        latency = (NA if self.latency is None else f"{_short(self.latency)} ms",
                   "" if self.throughput is None else f"{_short(self.throughput)}/s")
        test = (_metric(self.test), f"[{self.ci[0]:.3f}, {self.ci[1]:.3f}]" if self.test is not None and self.ci else "")
        trials = r.get("trials") if isinstance(r.get("trials"), dict) else {}
        complete, pruned, failed = (_num(trials.get(k)) for k in ("complete", "pruned", "failed"))
        trial_text = (f"{_count(complete)} / {_count(pruned)}" if complete is not None or pruned is not None else NA,
                      f"{failed:.0f} failed" if failed else "")
        return {"method": (self.method, ""), "settings": (describe_params(r.get("best_params")), ""),
                "parameters": parameters, "stored": (human_bytes(self.stored), ""), "storage_100": storage,
                "memory": memory, "training": training, "latency": latency, "test": test,
                "validation": (_metric(self.validation), ""), "trials": trial_text}

    def cells(self) -> dict[str, str]:
        """One line per cell: '74,498 (0.33%)', '0.910 [0.880, 0.930]'."""
        return {key: main if not detail else f"{main} {detail}" if key == "test" else f"{main} ({detail})"
                for key, (main, detail) in self.parts().items()}


def _columns(metric: str, higher: bool) -> list[tuple[str, str]]:
    direction = "higher is better" if higher else "lower is better"
    return [("method", "Method"), ("settings", "Best settings"), ("parameters", "Trainable parameters"),
            ("stored", "Stored per task"), ("storage_100", "Storage, 100 tasks"), ("memory", "Peak memory"),
            ("training", "Training time"), ("latency", "Latency / example (batched)"),
            ("test", f"Test {metric} [95% CI] ({direction})"), ("validation", f"Validation {metric}"),
            ("trials", "Trials (complete / pruned)")]


def _best(rows: Sequence[Row], higher: bool) -> set[int]:
    """Indexes of the rows with the best test metric (ties all win)."""
    scored = [(i, r.test) for i, r in enumerate(rows) if r.test is not None]
    if not scored:
        return set()
    target = (max if higher else min)(v for _, v in scored)
    return {i for i, v in scored if v == target}


# ---- "Reading the table": sentences computed from the rows, each skipped when its data is missing --------
def reading(rows: Sequence[Row], metric: str, higher: bool) -> list[str]:
    """Facts read off the table, as plain-text sentences (not escaped)."""
    facts: list[str] = []
    scored = sorted((r for r in rows if r.test is not None), key=lambda r: r.test or 0.0, reverse=higher)
    direction = "higher is better" if higher else "lower is better"
    if scored:
        best = scored[0]
        text = f"Best test {metric} ({direction}): {best.name}, {_metric(best.test)}"
        if best.ci:
            text += f" [{best.ci[0]:.3f}, {best.ci[1]:.3f}]"
        if best.examples is not None:
            text += f" on {best.examples:,.0f} test examples"
        facts.append(text + ".")
        if len(scored) > 1:
            second = scored[1]
            if best.ci and second.ci:
                overlap = best.ci[0] <= second.ci[1] and second.ci[0] <= best.ci[1]
                facts.append(
                    f"Runner-up: {second.name}, {_metric(second.test)}; the two 95% intervals "
                    + ("overlap, so this test set does not clearly separate them." if overlap
                       else "do not overlap."))
            else:
                facts.append(f"Runner-up: {second.name}, {_metric(second.test)}.")
    efficiency = []
    for r in rows:
        if r.test is None or (r.percent is None and r.parameters is None):
            continue
        if r.parameters == 0:
            efficiency.append(f"{r.name} {_metric(r.test)} with no training")
        elif r.percent is not None:
            efficiency.append(f"{r.name} {_metric(r.test)} with {_percent(r.percent)} of the parameters")
        else:
            efficiency.append(f"{r.name} {_metric(r.test)} with {_count(r.parameters)} trainable parameters")
    if efficiency:
        facts.append(f"Test {metric} against what is trained: " + "; ".join(efficiency) + ".")
    stored = sorted((r for r in rows if r.storage_100 is not None), key=lambda r: r.storage_100 or 0.0)
    if len(stored) > 1:
        fulls = [r for r in stored if r.is_full]
        others = ", ".join(f"{human_bytes(r.storage_100)} for {r.name}" for r in stored if r not in fulls[:1])
        if fulls:
            facts.append(f"For 100 tasks {fulls[0].name} stores {human_bytes(fulls[0].storage_100)} "
                         f"(100 whole models) against {others}.")
        else:
            facts.append(f"For 100 tasks (one shared base plus 100 adapters): {others}.")
    trained = [r for r in rows if r.seconds is not None and not r.untrained]
    if len(trained) > 1:
        fast, slow = min(trained, key=lambda r: r.seconds or 0.0), max(trained, key=lambda r: r.seconds or 0.0)
        if fast is not slow:
            facts.append(f"Training took from {_seconds(fast.seconds)} ({fast.name}) to {_seconds(slow.seconds)} "
                         f"({slow.name}).")
    memory = [r for r in rows if r.memory is not None]
    if len(memory) > 1:
        low, high = min(memory, key=lambda r: r.memory or 0.0), max(memory, key=lambda r: r.memory or 0.0)
        kinds = {r.memory_kind for r in memory}
        if low is not high:
            facts.append(f"Peak memory ranged from {human_bytes(low.memory)} ({low.name}) to "
                         f"{human_bytes(high.memory)} ({high.name})"
                         + ("; the figures mix CPU resident sets and CUDA peaks, so they are not comparable."
                            if len(kinds - {None}) > 1 else "."))
    meaning = {"rss": "rss is the peak resident set of the process that trained the method (base model, Python "
                      "and libraries included)", "cuda": "cuda is the CUDA allocator's peak"}
    shown = [text for kind, text in meaning.items() if any(r.memory_kind == kind for r in memory)]
    if shown:
        facts.append("Memory: " + "; ".join(shown) + ".")
    latency = [r for r in rows if r.latency is not None]
    if len(latency) > 1:
        quick, slow = min(latency, key=lambda r: r.latency or 0.0), max(latency, key=lambda r: r.latency or 0.0)
        if quick is not slow:
            facts.append(f"Latency ranged from {_short(quick.latency or 0.0)} ms per example ({quick.name}) to "
                         f"{_short(slow.latency or 0.0)} ms ({slow.name}).")
    for r in rows:
        failed = _num(_get(r.result, "trials", "failed"))
        if failed:
            facts.append(f"{r.name}: {failed:.0f} search trial{'' if failed == 1 else 's'} failed.")
    return facts


# ---- plots ---------------------------------------------------------------------------------------------
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
    axes.text(0.5, 0.5, f"no {what} to plot", ha="center", va="center", transform=axes.transAxes,
              fontsize=12, color="#666666")
    axes.set_xticks([])
    axes.set_yticks([])


def _quality_axis(axes: Any, metric: str, higher: bool) -> None:
    axes.set_ylabel(f"test {metric} ({'higher' if higher else 'lower'} is better)", fontsize=11)
    axes.grid(True, which="major", alpha=0.3)


def _scatter(axes: Any, points: list[tuple[int, float, float, tuple[float, float] | None, str]]) -> list[Any]:
    """Each point with its error bar (from the interval) and its label; colour and marker follow the method.
    Returns (label, lowest y, highest y) per point, to untangle the labels once the axes are final."""
    labels = []
    for index, x, y, ci, label in points:
        color, marker = _style(index)
        yerr = None if ci is None else [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
        axes.errorbar([x], [y], yerr=yerr, fmt=marker, color=color, markersize=9, capsize=4, elinewidth=1.4,
                      markeredgecolor="black", markeredgewidth=0.6)
        text = axes.annotate(label, (x, y), textcoords="offset points", xytext=(8, 6), fontsize=10, color="#222222")
        text.set_in_layout(False)
        labels.append((text, ci[0] if ci else y, ci[1] if ci else y))  # the layout is made for the axes; labels are then kept inside them
    axes.margins(y=0.12)
    return labels


# Where a label may sit around its point (offset in points, horizontal alignment), in order of preference.
LABEL_SPOTS = [((9, 4), "left"), ((9, -14), "left"), ((-9, 4), "right"), ((-9, -14), "right"),
               ((9, 18), "left"), ((9, -28), "left"), ((-9, 18), "right"), ((-9, -28), "right"),
               ((9, 32), "left"), ((9, -42), "left"), ((-9, 32), "right"), ((-9, -42), "right")]


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
        label = f"{r.method}: 0 (no training)" if r.parameters == 0 else f"{r.method}: {_compact(r.parameters)}"
        points.append((i, x, r.test, r.ci, label))
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
        label = f"{r.method}: no training" if r.untrained and seconds == 0 else f"{r.method}: {_seconds(seconds)}"
        points.append((i, x, r.test or 0.0, r.ci, label))
    labels = _scatter(axes, points)
    if log:
        axes.set_xscale("log")
        _pad_log(axes, [p[1] for p in points])
        zero = any(not r.seconds for _, r in usable)
        axes.set_xlabel("training time, seconds (log scale" + ("; 0 s drawn at the left)" if zero else ")"),
                        fontsize=11)
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
    axes.set_title("Peak memory while training" + (f": {what.get(kinds[0], kinds[0])}" if len(kinds) == 1 else ""),
                   fontsize=12)
    if not usable:
        _no_data(axes, "memory measurements")
        return _png(figure)
    labels = [r.method if len(kinds) < 2 else f"{r.method}\n({r.memory_kind or NA})" for _, r in usable]
    values = [(r.memory or 0.0) / 1e6 for _, r in usable]
    bars = axes.bar(range(len(usable)), values, color=[_style(i)[0] for i, _ in usable], edgecolor="black",
                    linewidth=0.6)
    for bar, value in zip(bars, values, strict=True):
        axes.annotate(f"{_short(value)} MB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      textcoords="offset points", xytext=(0, 3), ha="center", fontsize=10)
    axes.set_xticks(range(len(usable)))
    axes.set_xticklabels(labels, fontsize=10, rotation=0 if len(usable) <= 6 else 30)
    axes.set_ylabel("peak memory (MB)", fontsize=11)
    axes.set_ylim(0, max(values) * 1.15 + 1e-9)
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


# ---- writing -------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """A reader never sees half a file, and the file gets the umask's mode (not mkstemp's 0600)."""
    from multitune.storage import write_bytes_atomic

    write_bytes_atomic(path, data)


def _header(meta: dict[str, Any], metric: str, higher: bool) -> list[tuple[str, str]]:
    """(label, plain-text value) pairs for the report's header."""
    examples = meta.get("examples")
    if isinstance(examples, dict) and examples:
        example_text = ", ".join(f"{_count(examples.get(k))} {k}" for k in examples)
    else:
        example_text = NA

    def text(key: str) -> str:
        value = meta.get(key)
        return NA if value is None or value == "" else str(value)

    return [("Model", text("model")), ("Data", text("data")), ("Task", text("task")), ("Kind", text("kind")),
            ("Examples", example_text), ("Trials per method", text("trials")), ("Device", text("device")),
            ("Wall time", _seconds(meta.get("wall_seconds"))), ("Started", text("started")),
            ("Metric", f"{metric} ({'higher' if higher else 'lower'} is better)")]


def _md_cell(text: str) -> str:
    """A table cell for Markdown: no raw HTML, no column breaks, one line."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def _markdown(rows: Sequence[Row], meta: dict[str, Any], metric: str, higher: bool, best: set[int],
              facts: list[str]) -> str:
    lines = [f"# multitune compare: {_md_cell(str(meta.get('task') or NA))}", ""]
    for label, value in _header(meta, metric, higher):
        lines.append(f"- **{label}**: {_md_cell(value)}")
    command = meta.get("command")
    if command:
        lines += ["", "Command:", "", "```", str(command).replace("```", "` ` `"), "```"]
    columns = _columns(metric, higher)
    lines += ["", "## Comparison", "", "| " + " | ".join(title for _, title in columns) + " |",
              "|" + "|".join("---" for _ in columns) + "|"]
    for i, row in enumerate(rows):
        cells = row.cells()
        values = [_md_cell(cells[key]) for key, _ in columns]
        if i in best:
            values[[k for k, _ in columns].index("test")] = f"**{values[[k for k, _ in columns].index('test')]}**"
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", f"Best test {_md_cell(metric)} in bold. Storage for 100 tasks is the base model plus 100 stored "
              "adapters; for full fine-tuning it is 100 whole models. Latency is per example, one at a time; "
              "in brackets, examples per second when batched.", "", "## Reading the table", ""]
    lines += [f"- {_md_cell(fact)}" for fact in facts] or ["- No numbers to compare."]
    lines += ["", "## Plots", ""]
    for name, title in _plot_titles(metric).items():
        lines += [f"![{title}]({PLOTS}/{name}.png)", ""]
    return "\n".join(lines)


def _plot_titles(metric: str) -> dict[str, str]:
    return {"quality_vs_parameters": f"Test {metric} against trainable parameters (log scale)",
            "quality_vs_time": f"Test {metric} against training time",
            "memory": "Peak memory per method (MB)"}


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


def _html(rows: Sequence[Row], meta: dict[str, Any], metric: str, higher: bool, best: set[int], facts: list[str],
          pngs: dict[str, bytes]) -> str:
    title = f"multitune compare: {meta.get('task') or NA}"
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", "<main>",
           f"<h1>{e(title)}</h1>", '<dl class="meta">']
    for label, value in _header(meta, metric, higher):
        out.append(f"<dt>{e(label)}</dt><dd>{e(value)}</dd>")
    if meta.get("command"):
        out.append(f"<dt>Command</dt><dd><pre><code>{e(meta['command'])}</code></pre></dd>")
    out += ["</dl>", "<h2>Comparison</h2>", '<div class="scroll">', '<table id="comparison">', "<thead><tr>"]
    columns = _columns(metric, higher)
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
    out += ["</tbody>", "</table>", "</div>",
            f'<p class="note">Best test {e(metric)} in bold. Storage for 100 tasks is the base model plus 100 stored '
            "adapters; for full fine-tuning it is 100 whole models. Latency is per example, one at a time; in "
            "brackets, examples per second when batched.</p>", "<h2>Reading the table</h2>", '<ul class="facts">']
    out += [f"<li>{e(fact)}</li>" for fact in facts] or ["<li>No numbers to compare.</li>"]
    out += ["</ul>", "<h2>Plots</h2>", '<div class="plots">']
    for name, caption in _plot_titles(metric).items():
        data = base64.b64encode(pngs[name]).decode("ascii")
        out.append(f'<figure><img class="plot" id="plot-{name}" src="data:image/png;base64,{data}" '
                   f'alt="{e(caption)}"></figure>')
    out += ["</div>", "</main>", "</body>", "</html>", ""]
    return "\n".join(out)


def write_report(folder: str | Path, results: list[dict], meta: dict) -> dict[str, Path]:
    """Writes FOLDER/report.md, FOLDER/report.html (self-contained) and FOLDER/plots/*.png; returns their paths
    keyed 'md', 'html', 'quality_vs_parameters', 'quality_vs_time', 'memory'."""
    folder = Path(folder)
    (folder / PLOTS).mkdir(parents=True, exist_ok=True)
    meta = meta if isinstance(meta, dict) else {}
    results = [r for r in results if isinstance(r, dict)]
    metric, higher = _main_metric(results, meta)
    rows = [Row(r, metric) for r in results]
    best = _best(rows, higher)
    facts = reading(rows, metric, higher)
    pngs = {"quality_vs_parameters": plot_quality_vs_parameters(rows, metric, higher),
            "quality_vs_time": plot_quality_vs_time(rows, metric, higher),
            "memory": plot_memory(rows)}
    paths: dict[str, Path] = {}
    for name in PLOT_NAMES:
        paths[name] = folder / PLOTS / f"{name}.png"
        _write_atomic(paths[name], pngs[name])
    paths["md"] = folder / "report.md"
    _write_atomic(paths["md"], _markdown(rows, meta, metric, higher, best, facts).encode("utf-8"))
    paths["html"] = folder / "report.html"
    _write_atomic(paths["html"], _html(rows, meta, metric, higher, best, facts, pngs).encode("utf-8"))
    return {key: paths[key] for key in ("md", "html", *PLOT_NAMES)}
