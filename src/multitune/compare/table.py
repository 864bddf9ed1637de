"""The comparison table: one row per method, its cells, and the sentences read from it ("Reading the table").

Results come from files written by earlier (possibly older or interrupted) runs, so every field is optional:
a missing, null or NaN value is shown as ``n/a`` and a sentence that needs it is skipped. The formatters here
take anything and answer "n/a" for what they cannot read; the plots and the report use them too.

A method whose result did not learn (``learned: false``: its weights predict one label, or its loss stayed at
the chance level) scores the label prior, not the method: its test cell says "did not learn", it is never bold,
ranked or set against the best, and "Reading the table" says why it did not learn. With ``--seeds N`` a column
gives each method's mean test metric over N seeds with its sample standard deviation and range, and "Reading
the table" tells which methods are within seed noise of the best by this rule: two methods differ by no more
than seed noise when the difference of their means is no larger than the larger of their two standard
deviations (a sample standard deviation over the seeds; 0 for a method that trains nothing). For generation
tasks a column gives each method's general-text perplexity (:mod:`multitune.health.general`) beside the bare
base's: how much of the base's general language ability the method kept (lower is better).

With ``compare --audit`` a column per attribute gives each method's counterfactual flip rate on the test split
with its bootstrap 95% interval and the rows tested (:mod:`multitune.compare.audit`; for generation tasks the
mean change in the response log-probability); an attribute no test row mentions reads "no rows mention
ATTRIBUTE", never 0%. With ``--dp-epsilon`` a column gives the epsilon each DP-SGD run spent, its delta and
noise multiplier (result.json's ``dp``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NA = "n/a"
LOWER_IS_BETTER = ("loss", "perplexity")


def num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, null, NaN, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def get_field(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, or None where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def human_bytes(value: Any) -> str:
    """Decimal units, three significant digits at most: 301234 -> '301 kB', 9026458400 -> '9.0 GB'."""
    n = num(value)
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
    p = num(value)
    if p is None:
        return NA
    if p == 0:
        return "0%"
    if p >= 9.95:
        return f"{p:.0f}%"
    if p >= 1:
        return f"{p:.1f}%"
    return f"{p:.2g}%"


def count_text(value: Any) -> str:
    n = num(value)
    return NA if n is None else f"{n:,.0f}"


def compact(n: float) -> str:
    """A count for a plot label: 74498 -> '74.5k', 22713218 -> '22.7M'."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:.0f}"


def seconds_text(value: Any) -> str:
    s = num(value)
    if s is None:
        return NA
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def short(value: float) -> str:
    """A number in at most three significant digits, without exponent noise: 250.0 -> '250', 8.123 -> '8.12'."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def perplexity_text(value: Any) -> str:
    """A perplexity with two decimals (a method's and the base's often differ by less than one percent)."""
    v = num(value)
    return NA if v is None else f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def _metric(value: Any) -> str:
    v = num(value)
    return NA if v is None else f"{v:.3f}"


def _interval(ci: Any) -> tuple[float, float] | None:
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    lo, hi = num(ci[0]), num(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def _param_value(value: Any) -> str:
    v = num(value)
    if v is None or isinstance(value, int):
        return str(value)
    if v != 0 and abs(v) < 0.01:
        mantissa, exponent = f"{v:.1e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{v:.3g}"


def problem_reason(problem: Any) -> str:
    """Why a run did not learn, from train's problem line ("task 'T' did not learn: REASON; likely cause: ...")."""
    if not isinstance(problem, str) or not problem.strip():
        return "no reason recorded"
    return problem.split(" did not learn: ", 1)[-1].split("; likely cause: ", 1)[0].strip()


def problem_advice(problem: Any) -> str | None:
    """The likely cause and ``multitune train``'s fix from a problem line ("likely cause: ...; try ..."), if any."""
    if not isinstance(problem, str) or "likely cause: " not in problem:
        return None
    return "likely cause: " + problem.split("likely cause: ", 1)[1].strip().rstrip(".")


def describe_params(params: Any) -> str:
    """Compact settings: {'learning_rate': 0.002, 'lora.rank': 8, 'epochs': 2} -> 'lr 2e-3, rank 8, 2 epochs'."""
    if not isinstance(params, dict) or not params:
        return NA
    parts = []
    for key, value in params.items():
        name = str(key).split(".", 1)[-1]
        name = {
            "learning_rate": "lr",
            "head_learning_rate": "head lr",
            "num_virtual_tokens": "tokens",
            "reduction_factor": "factor",
        }.get(name, name)
        if name == "epochs" and num(value) is not None:
            parts.append(f"{_param_value(value)} epoch{'' if value == 1 else 's'}")
        elif name == "use_dora":  # compare --search-dora: which of the two won
            parts.append("DoRA" if value else "plain LoRA")
        else:
            parts.append(f"{name} {_param_value(value)}")
    return ", ".join(parts)


# ---- what the table shows ------------------------------------------------------------------------------
def main_metric(results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, bool]:
    """(metric, higher is better): the meta's, else the first result's; direction from the name if absent."""
    metric = meta.get("metric") if isinstance(meta.get("metric"), str) else None
    for result in results:
        if metric is None and isinstance(result.get("metric"), str):
            metric = result["metric"]
    metric = metric or "accuracy"
    higher = meta.get("higher_is_better")
    if not isinstance(higher, bool):
        higher = next(
            (
                r["higher_is_better"]
                for r in results
                if isinstance(r.get("higher_is_better"), bool) and r.get("metric") == metric
            ),
            metric not in LOWER_IS_BETTER,
        )
    return metric, higher


def _storage_100(result: dict[str, Any]) -> float | None:
    """Bytes for 100 tasks: as measured, else base + 100 x stored (for full, base is 0: each task a model)."""
    given = num(result.get("storage_100_tasks_bytes"))
    if given is not None:
        return given
    base, stored = num(result.get("base_bytes")), num(result.get("stored_bytes"))
    return None if base is None or stored is None else base + 100 * stored


class Seeds:
    """The test metric over ``--seeds`` runs of a method's settings (run.seed_runs), tolerant of anything missing.

    A method that trains nothing (``trains: false``) was run once: the seed changes nothing of it, so its
    spread is 0.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.trains = data.get("trains") is not False
        self.n = num(data.get("n"))
        self.learned = num(data.get("learned"))
        self.mean, self.min, self.max = num(data.get("mean")), num(data.get("min")), num(data.get("max"))
        self.std = num(data.get("std")) if self.trains else 0.0

    @staticmethod
    def read(data: Any) -> Seeds | None:
        return Seeds(data) if isinstance(data, dict) else None

    @property
    def usable(self) -> bool:
        """Whether it has a mean and a spread to compare with another method's."""
        return self.mean is not None and self.std is not None

    def learned_text(self) -> str:
        return f"{count_text(self.learned)} of {count_text(self.n)} seeds learned"


class Row:
    """One method's numbers, read once, tolerant of anything missing."""

    def __init__(self, result: dict[str, Any], metric: str) -> None:
        self.result = result
        self.method = str(result.get("method") or result.get("task") or NA)
        self.test = num(get_field(result, "test", metric))
        self.ci = _interval(get_field(result, "test_ci", metric))
        self.validation = num(get_field(result, "validation", metric))
        self.parameters = num(result.get("trainable_parameters"))
        self.percent = num(result.get("trainable_percent"))
        self.stored = num(result.get("stored_bytes"))
        self.storage_100 = _storage_100(result)
        self.memory = num(result.get("peak_memory_bytes"))
        kind = result.get("memory_kind")
        self.memory_kind = kind if isinstance(kind, str) else None
        self.seconds = num(result.get("train_seconds"))
        self.steps = num(result.get("steps"))
        self.latency = num(result.get("latency_ms"))
        self.throughput = num(result.get("throughput_per_s"))
        self.examples = num(result.get("test_examples"))
        self.is_full = self.method == "full" or num(result.get("base_bytes")) == 0
        self.untrained = self.parameters == 0 or self.steps == 0
        self.learned = result.get("learned") is not False  # results written before the check: learned
        self.problem = result.get("problem") if isinstance(result.get("problem"), str) else None
        self.rescue = result["rescue"] if isinstance(result.get("rescue"), dict) else None
        self.seeds = Seeds.read(result.get("seeds"))
        self.general = num(result.get("general_perplexity"))
        audit = get_field(result, "audit", "attributes")
        self.audit: dict[str, Any] = audit if isinstance(audit, dict) else {}
        self.dp = result["dp"] if isinstance(result.get("dp"), dict) else None

    @property
    def ranked(self) -> float | None:
        """The test metric a ranking may read: None for a method that did not learn."""
        return self.test if self.learned else None

    @property
    def name(self) -> str:
        """The method as a sentence names it."""
        return "full fine-tuning" if self.method == "full" else self.method

    def parts(self) -> dict[str, tuple[str, str]]:
        """Plain-text cells (not escaped) keyed by column, each as (main value, detail or "")."""
        r = self.result
        parameters = (count_text(self.parameters), _percent(self.percent) if self.percent is not None else "")
        if self.parameters == 0:
            parameters = ("0", "no training")
        storage = (
            human_bytes(self.storage_100),
            "100 models" if self.storage_100 is not None and self.is_full else "",
        )
        memory = (human_bytes(self.memory), (self.memory_kind or "") if self.memory is not None else "")
        training = (seconds_text(self.seconds), "")
        if self.steps is not None:
            steps = int(self.steps)
            if steps == 0:
                training = ("no training", "") if not self.seconds else (training[0], "no training")
            else:
                training = (training[0], f"{steps:,} step{'' if steps == 1 else 's'}")
        latency = (
            NA if self.latency is None else f"{short(self.latency)} ms",
            "" if self.throughput is None else f"{short(self.throughput)}/s",
        )
        test = (
            _metric(self.test),
            f"[{self.ci[0]:.3f}, {self.ci[1]:.3f}]" if self.test is not None and self.ci else "",
        )
        if not self.learned:  # its score is the label prior's: shown, but not as the method's quality
            test = ("did not learn", f"(scored {_metric(self.test)})" if self.test is not None else "")
        trials = r.get("trials")
        trials = trials if isinstance(trials, dict) else {}
        complete, pruned, failed = (num(trials.get(k)) for k in ("complete", "pruned", "failed"))
        trial_text = (
            f"{count_text(complete)} / {count_text(pruned)}"
            if complete is not None or pruned is not None
            else NA,
            f"{failed:.0f} failed" if failed else "",
        )
        return {
            "method": (self.method, ""),
            "settings": (describe_params(r.get("best_params")), "rescue run" if self.rescue else ""),
            "parameters": parameters,
            "stored": (human_bytes(self.stored), ""),
            "storage_100": storage,
            "memory": memory,
            "training": training,
            "latency": latency,
            "test": test,
            "validation": (_metric(self.validation), ""),
            "trials": trial_text,
            "seeds": self._seed_cell(),
            "general": (perplexity_text(self.general), ""),
            "dp": self._dp_cell(),
            **{f"audit:{name}": self.audit_cell(name) for name in self.audit},
        }

    def _dp_cell(self) -> tuple[str, str]:
        """'7.98', 'delta 1e-05, noise 0.912' for a DP-SGD run; 'not private' for a run without DP."""
        if self.dp is None:
            return "not private", ""
        epsilon, delta, noise = (num(self.dp.get(k)) for k in ("epsilon", "delta", "noise_multiplier"))
        detail = ", ".join(
            p
            for p in (
                f"delta {delta:.0e}" if delta is not None else "",
                f"noise {noise:.3g}" if noise is not None else "",
            )
            if p
        )
        return (NA if epsilon is None else f"{epsilon:.2f}"), detail

    def audit_cell(self, name: str) -> tuple[str, str]:
        """'4.8% [1.6%, 9.7%]', '62 rows tested'; 'no rows mention gender'; a log-probability change for
        generation; n/a for a method that did not learn (a one-label predictor never flips)."""
        test = self.audit.get(name)
        test = test if isinstance(test, dict) else {}
        tested = num(test.get("tested"))
        if not tested:
            return f"no rows mention {name}", ""
        rows = f"{count_text(tested)} row{'' if tested == 1 else 's'} tested"
        if not self.learned:
            return NA, "did not learn"
        if "mean_delta_logp" in test:
            value, ci = num(test.get("mean_delta_logp")), _interval(test.get("mean_delta_logp_ci"))
            if value is None:
                return NA, rows
            return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""), rows
        value, ci = num(test.get("flip_rate")), _interval(test.get("flip_rate_ci"))
        if value is None:
            return NA, rows
        return f"{value:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""), rows

    def _seed_cell(self) -> tuple[str, str]:
        """'0.905 ± 0.010', '0.890–0.920, 3 seeds'; 'did not learn' for a non-learner; one run if nothing trains."""
        s = self.seeds
        if s is None or s.mean is None:
            return NA, ""
        if not s.trains:
            return _metric(s.mean), "no training: one run"
        if not self.learned:
            return "did not learn", s.learned_text()
        main = _metric(s.mean) + (f" ± {s.std:.3f}" if s.std is not None else "")
        spread = f"{_metric(s.min)}–{_metric(s.max)}"
        learned_all = s.learned is not None and s.learned == s.n
        return main, spread + (f", {count_text(s.n)} seeds" if learned_all else f", {s.learned_text()}")

    def cells(self) -> dict[str, str]:
        """One line per cell: '74,498 (0.33%)', '0.910 [0.880, 0.930]'."""
        return {
            key: main if not detail else f"{main} {detail}" if key == "test" else f"{main} ({detail})"
            for key, (main, detail) in self.parts().items()
        }


def table_columns(
    metric: str,
    higher: bool,
    seeds: bool = False,
    general: bool = False,
    general_base: float | None = None,
    audit: Sequence[str] = (),
    generation: bool = False,
    dp: bool = False,
) -> list[tuple[str, str]]:
    """The table's (key, title) columns; the seeds column only when some method was run with several seeds,
    the general-text perplexity column (its title holds the base's, ``general_base``) only when some has one,
    a column per audited attribute (``audit``; the log-probability change for ``generation``) and the
    privacy column (``dp``) only when some method has them."""
    direction = "higher is better" if higher else "lower is better"
    seed_column = [("seeds", f"Test {metric} over seeds: mean ± std (min–max)")] if seeds else []
    base = f"base {perplexity_text(general_base)}; " if general_base is not None else ""
    general_column = [("general", f"General-text perplexity ({base}lower is better)")] if general else []
    audit_columns = [
        (
            f"audit:{name}",
            f"Change in response log-prob, {name} swaps [95% CI]"
            if generation
            else f"Flip rate, {name} swaps [95% CI] (lower is better)",
        )
        for name in audit
    ]
    dp_column = [("dp", "DP epsilon spent (delta, noise multiplier)")] if dp else []
    return [
        ("method", "Method"),
        ("settings", "Best settings"),
        ("parameters", "Trainable parameters"),
        ("stored", "Stored per task"),
        ("storage_100", "Storage, 100 tasks"),
        ("memory", "Peak memory"),
        ("training", "Training time"),
        ("latency", "Latency / example (batched)"),
        ("test", f"Test {metric} [95% CI] ({direction})"),
        *seed_column,
        *general_column,
        *audit_columns,
        *dp_column,
        ("validation", f"Validation {metric}"),
        ("trials", "Trials (complete / pruned)"),
    ]


def has_general(rows: Sequence[Row]) -> bool:
    """Whether any method has a general-text perplexity (the table then has its column)."""
    return any(r.general is not None for r in rows)


def audited(rows: Sequence[Row]) -> list[str]:
    """The attributes some method was audited for, in the order first met (the table's audit columns)."""
    return list(dict.fromkeys(name for r in rows for name in r.audit))


def has_dp(rows: Sequence[Row]) -> bool:
    """Whether any method was trained with DP-SGD (the table then has the privacy column)."""
    return any(r.dp is not None for r in rows)


def has_seeds(rows: Sequence[Row]) -> bool:
    """Whether any method was run with several seeds (the table then has the seeds column)."""
    return any(r.seeds is not None and (r.seeds.n or 0) > 1 for r in rows)


def best_rows(rows: Sequence[Row], higher: bool) -> set[int]:
    """Indexes of the rows with the best test metric (ties all win); a method that did not learn is never one."""
    scored = [(i, r.ranked) for i, r in enumerate(rows) if r.ranked is not None]
    if not scored:
        return set()
    target = (max if higher else min)(v for _, v in scored)
    return {i for i, v in scored if v == target}


# ---- "Reading the table": sentences computed from the rows, each skipped when its data is missing --------
def reading(rows: Sequence[Row], metric: str, higher: bool, general_base: float | None = None) -> list[str]:
    """Facts read off the table, as plain-text sentences (not escaped)."""
    return [
        *_not_learned(rows, metric),
        *_ranking(rows, metric, higher),
        *_seed_noise(rows, metric, higher),
        *_efficiency(rows, metric),
        *_general(rows, general_base),
        *_audit(rows),
        *_privacy(rows),
        *_storage(rows),
        *_spread(rows, "seconds", "Training took", seconds_text, " to "),
        *_memory(rows),
        *_spread(rows, "latency", "Latency ranged", lambda v: f"{short(v or 0.0)} ms per example", " to "),
        *(
            f"{r.name}: {failed:.0f} search trial{'' if failed == 1 else 's'} failed."
            for r in rows
            if (failed := num(get_field(r.result, "trials", "failed")))
        ),
    ]


def _ranking(rows: Sequence[Row], metric: str, higher: bool) -> list[str]:
    """The best method by the test metric, and whether the runner-up's interval overlaps its own."""
    scored = sorted((r for r in rows if r.ranked is not None), key=lambda r: r.test or 0.0, reverse=higher)
    if not scored:
        return ["No method learned, so none is ranked."] if any(not r.learned for r in rows) else []
    best = scored[0]
    text = (
        f"Best test {metric} ({'higher' if higher else 'lower'} is better): {best.name}, {_metric(best.test)}"
    )
    if best.ci:
        text += f" [{best.ci[0]:.3f}, {best.ci[1]:.3f}]"
    if best.examples is not None:
        text += f" on {best.examples:,.0f} test examples"
    facts = [text + "."]
    if len(scored) > 1:
        second = scored[1]
        runner = f"Runner-up: {second.name}, {_metric(second.test)}"
        if best.ci and second.ci:
            overlap = best.ci[0] <= second.ci[1] and second.ci[0] <= best.ci[1]
            runner += "; the two 95% intervals " + (
                "overlap, so this test set does not clearly separate them" if overlap else "do not overlap"
            )
        noise = _noise(best, second)
        if noise is not None:
            runner += f"; over seeds {noise}"
        facts.append(runner + ".")
    return facts


def rescue_scale(cause: str | None) -> str:
    """How a rescue run moved the learning rate, in words: "a quarter of" or "four times"."""
    return "four times" if cause == "slow" else "a quarter of"


def _not_learned(rows: Sequence[Row], metric: str) -> list[str]:
    """Which methods did not learn and why (never ranked); which were rescued by a run at another learning rate."""
    facts = []
    for r in rows:
        rescue = r.rescue or {}
        lowered = describe_params({"learning_rate": get_field(rescue, "params", "learning_rate")})
        if not r.learned:
            text = f"{r.name} did not learn: {problem_reason(r.problem)}"
            if rescue:
                text += (
                    f"; the rescue run at {rescue_scale(rescue.get('cause'))} the learning rate ({lowered}) "
                    "did not learn either"
                )
            text += f". Its test {metric}"
            text += f" ({_metric(r.test)})" if r.test is not None else ""
            text += " is not its quality on this task, so it is not ranked"
            advice = problem_advice(r.problem)
            # train's advice names train's flags (compare searches the learning rate itself)
            facts.append(
                text + (f". The {advice}, with multitune train --method {r.method}." if advice else ".")
            )
        elif rescue:
            before = describe_params(rescue.get("from_params"))
            facts.append(
                f"{r.name} was rescued: its {rescue.get('after') or 'final run'} did not learn at {before} "
                f"({problem_reason(rescue.get('problem'))}); one more run at {rescue_scale(rescue.get('cause'))} "
                f"the learning rate ({lowered}) learned, and the row is that run."
            )
    return facts


def _noise(a: Row, b: Row) -> str | None:
    """'the difference of their means (0.004) is within seed noise (...)', or None without
    seeds for both."""
    if a.seeds is None or b.seeds is None or not a.seeds.usable or not b.seeds.usable:
        return None
    difference, noise = _gap(a.seeds, b.seeds)
    if difference <= noise:
        return f"the difference of their means ({difference:.3f}) is within seed noise (not above the larger std, {noise:.3f})"
    return f"the difference of their means ({difference:.3f}) is beyond seed noise (the larger std is {noise:.3f})"


def _gap(a: Seeds, b: Seeds) -> tuple[float, float]:
    """(difference of the two means, the larger of the two standard deviations): the seed-noise rule's terms."""
    return abs((a.mean or 0.0) - (b.mean or 0.0)), max(a.std or 0.0, b.std or 0.0)


def _seed_noise(rows: Sequence[Row], metric: str, higher: bool) -> list[str]:
    """The best mean over seeds, which methods are within seed noise of it (the rule stated), and which seed
    runs did not learn; methods that did not learn take no part."""
    seeded = [(r, r.seeds) for r in rows if r.learned and r.seeds is not None and r.seeds.usable]
    facts = [
        f"{r.name}: {s.learned_text()}; a seed run that did not learn counts in the mean and spread."
        for r, s in seeded
        if s.trains and s.learned != s.n
    ]
    if len(seeded) < 2:
        return facts
    best, top = (max if higher else min)(seeded, key=lambda pair: pair[1].mean or 0.0)
    within: list[str] = []
    beyond: list[str] = []
    for r, s in seeded:
        if r is best:
            continue
        difference, noise = _gap(s, top)
        (within if difference <= noise else beyond).append(f"{r.name} ({difference:.3f} against {noise:.3f})")
    text = (
        f"Seed noise: two methods differ by no more than seed noise when the difference of their mean test {metric} "
        f"over seeds is no larger than the larger of their two standard deviations. Best mean: {best.name}, "
        f"{_metric(top.mean)} ± {top.std or 0.0:.3f}"
    )
    if within:
        text += "; within seed noise of it (difference against the larger std): " + ", ".join(within)
    if beyond:
        text += "; beyond seed noise (difference against the larger std): " + ", ".join(beyond)
    return [text + ".", *facts]


def _efficiency(rows: Sequence[Row], metric: str) -> list[str]:
    parts = []
    for r in rows:
        if r.ranked is None or (r.percent is None and r.parameters is None):
            continue
        if r.parameters == 0:
            parts.append(f"{r.name} {_metric(r.test)} with no training")
        elif r.percent is not None:
            parts.append(f"{r.name} {_metric(r.test)} with {_percent(r.percent)} of the parameters")
        else:
            parts.append(f"{r.name} {_metric(r.test)} with {count_text(r.parameters)} trainable parameters")
    return [f"Test {metric} against what is trained: " + "; ".join(parts) + "."] if parts else []


def _general(rows: Sequence[Row], base: float | None) -> list[str]:
    """Each method's general-text perplexity, against the base's when it is known (the change in percent)."""
    parts = []
    for r in rows:
        if r.general is None:
            continue
        change = f" ({100 * (r.general / base - 1):+.1f}%)" if base else ""
        parts.append(f"{r.name} {perplexity_text(r.general)}{change}")
    if not parts:
        return []
    against = f"the base's is {perplexity_text(base)}; " if base is not None else ""
    return [
        f"General-text perplexity ({against}lower keeps more of the base's general ability): "
        + "; ".join(parts)
        + "."
    ]


def _audit(rows: Sequence[Row]) -> list[str]:
    """Per audited attribute: each method's flip rate (or log-probability change) and the lowest, or that no
    test row mentions the attribute; methods that did not learn take no part."""
    facts = []
    for name in audited(rows):
        cells = [(r, r.audit_cell(name)) for r in rows if name in r.audit]
        if all(main.startswith("no rows mention") for _, (main, _) in cells):
            facts.append(
                f"Bias audit, {name}: no test row mentions a term of its lexicon, so no flip rate was measured "
                "(0 rows tested)."
            )
            continue
        shown = [f"{r.name} {main} ({detail})" for r, (main, detail) in cells if r.learned and main != NA]
        if not shown:
            continue
        logp = any("mean_delta_logp" in (r.audit.get(name) or {}) for r, _ in cells)
        what = (
            "mean change in the response's log-probability when the prompt's terms are swapped"
            if logp
            else "share of a row's swapped versions whose predicted label changes"
        )
        text = f"Bias audit, {name} ({what}, on the test rows that mention a term): " + "; ".join(shown)
        rates = [
            (r, v)
            for r, _ in cells
            if r.learned and (v := num((r.audit.get(name) or {}).get("flip_rate"))) is not None
        ]
        if len(rates) > 1:
            low = min(rates, key=lambda pair: pair[1])
            text += f". Lowest: {low[0].name}"
        facts.append(text + ".")
    return facts


def _privacy(rows: Sequence[Row]) -> list[str]:
    """Each DP-SGD run's epsilon spent against its target, delta and noise multiplier."""
    private = [r for r in rows if r.dp is not None]
    if not private:
        return []
    parts = []
    for r in private:
        dp = r.dp or {}
        epsilon, target, delta = num(dp.get("epsilon")), num(dp.get("target_epsilon")), num(dp.get("delta"))
        noise = num(dp.get("noise_multiplier"))
        text = f"{r.name} spent epsilon {NA if epsilon is None else f'{epsilon:.2f}'}"
        text += f" of {short(target)}" if target is not None else ""
        text += f" at delta {delta:.0e}" if delta is not None else ""
        text += f", noise multiplier {noise:.3g}" if noise is not None else ""
        parts.append(text)
    others = [r.name for r in rows if r.dp is None]
    tail = f"; not private: {', '.join(others)}" if others else ""
    return [
        "Differential privacy (DP-SGD, per-sample clipping and Gaussian noise): "
        + "; ".join(parts)
        + tail
        + "."
    ]


def _storage(rows: Sequence[Row]) -> list[str]:
    stored = sorted((r for r in rows if r.storage_100 is not None), key=lambda r: r.storage_100 or 0.0)
    if len(stored) < 2:
        return []
    fulls = [r for r in stored if r.is_full]
    others = ", ".join(f"{human_bytes(r.storage_100)} for {r.name}" for r in stored if r not in fulls[:1])
    if fulls:
        return [
            f"For 100 tasks {fulls[0].name} stores {human_bytes(fulls[0].storage_100)} "
            f"(100 whole models) against {others}."
        ]
    return [f"For 100 tasks (one shared base plus 100 adapters): {others}."]


def _spread(rows: Sequence[Row], field: str, what: str, show: Any, joiner: str) -> list[str]:
    """ "WHAT from LOW (method) to HIGH (method)." over the rows that have ``field`` (training: trained ones)."""
    have = [r for r in rows if getattr(r, field) is not None and not (field == "seconds" and r.untrained)]
    if len(have) < 2:
        return []
    low = min(have, key=lambda r: getattr(r, field) or 0.0)
    high = max(have, key=lambda r: getattr(r, field) or 0.0)
    if low is high:
        return []
    return [
        f"{what} from {show(getattr(low, field))} ({low.name}){joiner}{show(getattr(high, field))} "
        f"({high.name})."
    ]


def _memory(rows: Sequence[Row]) -> list[str]:
    memory = [r for r in rows if r.memory is not None]
    facts = []
    if len(memory) > 1:
        low, high = min(memory, key=lambda r: r.memory or 0.0), max(memory, key=lambda r: r.memory or 0.0)
        if low is not high:
            mixed = len({r.memory_kind for r in memory} - {None}) > 1
            facts.append(
                f"Peak memory ranged from {human_bytes(low.memory)} ({low.name}) to "
                f"{human_bytes(high.memory)} ({high.name})"
                + (
                    "; the figures mix CPU resident sets and CUDA peaks, so they are not comparable."
                    if mixed
                    else "."
                )
            )
    meaning = {
        "rss": "rss is the peak resident set of the process that trained the method (base model, Python "
        "and libraries included)",
        "cuda": "cuda is the CUDA allocator's peak",
    }
    shown = [text for kind, text in meaning.items() if any(r.memory_kind == kind for r in memory)]
    if shown:
        facts.append("Memory: " + "; ".join(shown) + ".")
    return facts


# ---- plots ---------------------------------------------------------------------------------------------
