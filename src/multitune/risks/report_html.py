"""The HTML page of ``multitune audit``: the counterfactual table, the invariance table, metrics per group and
the worst examples, in one self-contained file (the monitor page's style: inline CSS, no scripts, no external
requests; every string from the user's data is escaped)."""

from __future__ import annotations

import html
from typing import Any

from multitune.health.report_html import STYLE


def _e(value: Any) -> str:
    return html.escape(str(value))


def _rate(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    ci = f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else ""
    return f"{value:.1%}{ci}"


def _delta(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    ci = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
    return f"{value:.3f}{ci}"


def _logps(attributes: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}{'' if r['tested'] else ' (no term in the data)'}</td><td class='num'>{r['tested']}</td>"
        f"<td class='num'>{r['counterfactuals']}</td>"
        f"<td class='num'>{_delta(r['mean_delta_logp'], r['mean_delta_logp_ci'])}</td>"
        f"<td class='num'>{_delta(r['mean_abs_delta_logp'], r['mean_abs_delta_logp_ci'])}</td></tr>"
        for name, r in attributes.items()
    )
    return (
        "<table class='attributes'><tr><th>attribute</th><th>rows tested</th><th>counterfactuals</th>"
        "<th>change in response log-prob [95% CI]</th><th>mean |change| [95% CI]</th></tr>"
        f"{rows}</table>"
    )


def _attributes(attributes: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in attributes.items():
        note = "" if r["tested"] else " (no term in the data)"
        rows.append(
            f"<tr><td>{_e(name)}{note}</td><td class='num'>{r['tested']}</td>"
            f"<td class='num'>{r['counterfactuals']}</td>"
            f"<td class='num'>{_rate(r['flip_rate'], r['flip_rate_ci'])}</td>"
            f"<td class='num'>{_delta(r['mean_abs_delta_p'], r['mean_abs_delta_p_ci'])}</td></tr>"
        )
    return (
        "<table class='attributes'><tr><th>attribute</th><th>rows tested</th><th>counterfactuals</th>"
        f"<th>flip rate [95% CI]</th><th>mean |&Delta;p| [95% CI]</th></tr>{''.join(rows)}</table>"
    )


def _invariance(checks: dict[str, dict[str, Any]], threshold: float) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td class='num'>{r['tested']}</td>"
        f"<td class='num'>{_rate(r['failure_rate'], r['failure_rate_ci'])}</td></tr>"
        for name, r in checks.items()
    )
    return (
        f"<p>A row fails when its label changes or its label's probability moves by more than {threshold}."
        "</p><table><tr><th>perturbation</th><th>rows tested</th><th>failure rate [95% CI]</th></tr>"
        f"{rows}</table>"
    )


def _groups(groups: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(g)}</td><td class='num'>{m['rows']}</td><td class='num'>{m['accuracy']:.3f}</td>"
        f"<td class='num'>{m['error_rate']:.3f}</td></tr>"
        for g, m in {**groups["groups"], "(all)": groups["overall"]}.items()
    )
    ratio = groups["accuracy_ratio"]
    return (
        "<table><tr><th>group</th><th>rows</th><th>accuracy</th><th>error rate</th></tr>"
        f"{rows}</table><p>largest accuracy difference {groups['accuracy_difference']:.3f}; smallest ratio "
        f"{'n/a' if ratio is None else f'{ratio:.3f}'}</p>"
    )


def _worst(name: str, worst: list[dict[str, Any]]) -> str:
    if not worst:
        return ""
    if "delta_logp" in worst[0]:
        cells = "".join(
            f"<tr><td>{_e(w['text'])}</td><td>{_e(w['counterfactual'])}</td><td>{_e(w['response'])}</td>"
            f"<td class='num'>{w['delta_logp']:+.3f}</td></tr>"
            for w in worst
        )
        return (
            f"<h3>{_e(name)}: largest changes</h3><table><tr><th>prompt</th><th>counterfactual</th>"
            f"<th>response</th><th>change in log-prob</th></tr>{cells}</table>"
        )
    rows = "".join(
        f"<tr><td>{_e(w['text'])}</td><td>{_e(w['counterfactual'])}</td>"
        f"<td>{_e(w['label'])} &rarr; {_e(w['counterfactual_label'])}</td>"
        f"<td class='num'>{w['p']:.3f} &rarr; {w['p_counterfactual']:.3f}</td></tr>"
        for w in worst
    )
    return (
        f"<h3>{_e(name)}: largest changes</h3><table><tr><th>input</th><th>counterfactual</th>"
        f"<th>label</th><th>p(label)</th></tr>{rows}</table>"
    )


def _membership(result: dict[str, Any]) -> str:
    low, high = result["auc_ci"]
    return (
        "<h2>Memorisation: membership attack</h2><table><tr><th>attack</th><th>ROC AUC [95%]</th>"
        "<th>advantage (max TPR-FPR)</th><th>training rows</th><th>held-out rows</th><th>mean loss (train / "
        f"held-out)</th></tr><tr><td>{_e(result['attack'])}</td><td>{result['auc']:.3f} [{low:.3f}, {high:.3f}]"
        f"</td><td>{result['advantage']:.3f}</td><td>{result['members']}</td><td>{result['non_members']}</td>"
        f"<td>{result['mean_loss_members']:.3f} / {result['mean_loss_non_members']:.3f}</td></tr></table>"
        "<p>lower loss is guessed to be a training row; an AUC of 0.5 is no leak</p>"
    )


def _canaries(result: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(c['prompt'])}</td><td>{_e(c['secret'])}</td><td>{c['logp']:.2f}</td>"
        f"<td>{c['rank']:.0f}</td><td>{c['exposure']:.2f}</td></tr>"
        for c in result["canaries"]
    )
    return (
        f"<h2>Memorisation: canaries</h2><p>exposure mean {result['mean_exposure']:.2f}, max "
        f"{result['max_exposure']:.2f} of at most {result['max_possible']:.2f} bits; each canary inserted "
        f"{result['repeats']} times, ranked among {result['samples']} sampled secrets of {result['space']}</p>"
        "<table><tr><th>prompt</th><th>secret</th><th>log-probability</th><th>estimated rank</th>"
        f"<th>exposure</th></tr>{rows}</table>"
    )


def _consistency(result: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_e(r['prompt'])}</td><td>{_e(r['greedy'])}</td><td>{_e(' | '.join(r['samples']))}</td>"
        f"<td>{r['consistency']:.3f}</td><td>{r['mean_token_logp']:.3f}</td></tr>"
        for r in result["least_consistent"]
    )
    return (
        f"<h2>Hallucination signal: self-consistency</h2><p>{result['rows']} prompts; mean self-consistency "
        f"{result['mean_consistency']:.3f} (unigram F1 of the greedy answer against {result['samples']} samples at "
        f"temperature {result['temperature']:g}), mean token log-probability {result['mean_token_logp']:.3f}</p>"
        "<table><tr><th>prompt</th><th>greedy answer</th><th>samples</th><th>consistency</th>"
        f"<th>mean token log-probability</th></tr>{rows}</table>"
    )


def _golden(result: dict[str, Any]) -> str:
    cells = [("metric", result["metric"]), ("score", f"{result['score']:.4f}"), ("rows", str(result["rows"]))]
    if result["metric"] == "rouge_l":
        cells += [("exact match", f"{result['exact_match']:.4f}"), ("token F1", f"{result['token_f1']:.4f}")]
    head = "".join(f"<th>{_e(k)}</th>" for k, _ in cells)
    body = "".join(f"<td>{_e(v)}</td>" for _, v in cells)
    return f"<h2>Golden set</h2><table><tr>{head}</tr><tr>{body}</tr></table>"


def audit_html(report: dict[str, Any]) -> str:
    """The whole page of an audit (the dict :func:`multitune.risks.audit.audit` writes as JSON)."""
    golden = _golden(report["golden"]) if "golden" in report else ""
    if report.get("data") is None:  # audit --golden FILE alone
        return (
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>multitune audit: {_e(report.get('task', ''))}</title><style>{STYLE}</style></head><body>"
            f"<h1>Audit of task {_e(report.get('task', ''))}</h1>{golden}</body></html>"
        )
    groups = f"<h2>Metrics per group</h2>{_groups(report['groups'])}" if "groups" in report else ""
    worst = "".join(_worst(n, r["worst"]) for n, r in report["attributes"].items())
    generation = report.get("kind") == "generation"
    table = _logps(report["attributes"]) if generation else _attributes(report["attributes"])
    membership = _membership(report["membership"]) if "membership" in report else ""
    membership += _canaries(report["canaries"]) if "canaries" in report else ""
    membership += _consistency(report["consistency"]) if "consistency" in report else ""
    invariance = (
        ""
        if generation
        else (f"<h2>Invariance tests</h2>{_invariance(report['invariance'], report['threshold'])}")
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>multitune audit: {_e(report.get('task', ''))}</title><style>{STYLE}</style></head><body>"
        f"<h1>Bias audit of task {_e(report.get('task', ''))}</h1><p class='meta'>{report['rows']} rows of "
        f"{_e(report.get('data', ''))}; bootstrap intervals over rows ({report['resamples']} resamples, seed "
        f"{report['seed']})</p><h2>Counterfactual tests</h2>{table}{invariance}{groups}{membership}{golden}"
        f"<h2>Worst examples</h2>{worst or '<p>none</p>'}</body></html>"
    )
