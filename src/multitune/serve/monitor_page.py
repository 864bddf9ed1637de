"""The ``/monitor`` web page: one card per served task, drawn in the browser from ``GET /v1/monitor``.

Self-contained: the HTML, the CSS and a small script in one string, charts drawn as inline SVG, no CDN and no
other file, so that it works on a server without internet access. Each card shows the task's drift score over
time (its ``history``, alarm checks shaded red), its reference and live label distributions, the label-free
accuracy estimate beside the live accuracy from feedback, its alarm state and its tests; a task without a
profile shows the command that builds one. The page refreshes every 5 s.

Keys: the page itself holds no data and is served without a key; its requests to ``/v1/monitor`` carry
``Authorization: Bearer KEY`` when a key is given as ``/monitor?key=KEY`` (then moved out of the address bar
into the tab's session storage) or typed into its key field. Every text from the server (task names, labels,
reasons) is put in the page as text, never parsed as HTML.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>multitune monitor</title>
<link rel="icon" href="data:,">
<style>
:root { --fg: #1d2433; --muted: #5b6475; --line: #d8dde6; --bg: #f3f5f9; --card: #fff;
  --ok: #1a7f37; --alarm: #c62828; --ref: #8aa4c8; --live: #e07b00; --score: #2f5fa7; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; align-items: center; gap: 16px; flex-wrap: wrap; padding: 12px 24px;
  background: #1d2433; color: #fff; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
#status { color: #c9d1e0; }
#keyform { margin-left: auto; display: flex; gap: 6px; align-items: center; }
#keyform input { width: 220px; padding: 4px 6px; border-radius: 4px; border: 1px solid #4b5568; }
#keyform button { padding: 4px 10px; border-radius: 4px; border: 0; background: #e8edf5; cursor: pointer; }
#message { margin: 12px 24px 0; min-height: 1em; }
#message.error { color: var(--alarm); font-weight: 600; }
main { padding: 12px 24px 24px; display: grid; gap: 16px; align-items: start;
  grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
@media (max-width: 600px) { main { grid-template-columns: 1fr; padding: 12px; } }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px;
  min-width: 0; }
.card.alarm { border-color: var(--alarm); box-shadow: 0 0 0 2px rgba(198, 40, 40, .2); }
.card h2 { font-size: 16px; margin: 0; display: flex; gap: 8px; align-items: center; flex-wrap: wrap;
  overflow-wrap: anywhere; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px; background: #e8edf5;
  color: var(--muted); }
.badge.alarm { background: var(--alarm); color: #fff; }
.badge.ok { background: #dcefe0; color: var(--ok); }
.badge.unmonitored { background: #fff1c7; color: #7a5a00; }
.meta { color: var(--muted); font-size: 12px; margin: 2px 0 6px; }
.section { margin-top: 10px; }
.section h3 { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted);
  margin: 0 0 4px; font-weight: 600; }
svg { display: block; width: 100%; height: auto; }
.note { background: #fff8e1; border: 1px solid #f0d58c; padding: 8px 10px; border-radius: 6px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; background: #f0f2f6;
  padding: 1px 4px; border-radius: 3px; overflow-wrap: anywhere; }
table.tests { width: 100%; border-collapse: collapse; font-size: 12px; }
table.tests th, table.tests td { padding: 2px 6px 2px 0; border-bottom: 1px solid #eef0f4; text-align: left; }
table.tests td.num { font-variant-numeric: tabular-nums; }
.legend { font-size: 12px; color: var(--muted); display: flex; gap: 12px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; margin-right: 4px;
  vertical-align: -1px; background: var(--c); border-radius: 2px; }
</style>
</head>
<body>
<header>
  <h1>multitune monitor</h1>
  <span id="status">loading&hellip;</span>
  <form id="keyform" autocomplete="off">
    <label for="key">API key</label>
    <input id="key" type="password" autocomplete="off" placeholder="only if the server has one">
    <button type="submit">Use key</button>
  </form>
</header>
<p id="message" role="status"></p>
<main id="cards" aria-live="polite"></main>
<script>
(() => {
  "use strict";
  const REFRESH_MS = 5000;
  const SAVED = "multitune-monitor-key";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // The key: from ?key= (moved out of the address bar and the history), the tab's storage, or the field.
  const params = new URLSearchParams(location.search);
  let key = params.get("key") || sessionStorage.getItem(SAVED) || "";
  if (params.has("key")) {
    if (key) sessionStorage.setItem(SAVED, key);
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  $("keyform").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value.trim();
    if (key) sessionStorage.setItem(SAVED, key); else sessionStorage.removeItem(SAVED);
    $("key").value = "";
    refresh();
  });

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  function sv(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const known = (x) => typeof x === "number" && Number.isFinite(x);
  const num = (x, digits = 3) => (known(x) ? x.toFixed(digits) : "\\u2013");
  const pct = (x) => (known(x) ? (100 * x).toFixed(1) + "%" : "\\u2013");
  const pval = (x) => (known(x) && x > 0 && x < 0.001 ? x.toExponential(1) : num(x));

  // Drift score over the task's requests, the alarm threshold dashed; checks that alarmed shaded red.
  function historyChart(history, threshold) {
    const W = 560, H = 150, L = 44, R = 12, T = 10, B = 26;
    const chart = sv("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", class: "history",
      "aria-label": "drift score over requests"});
    chart.append(sv("rect", {x: 0, y: 0, width: W, height: H, fill: "#fbfcfe"}));
    const points = (history || []).filter((h) => Array.isArray(h) && known(h[0]));
    if (!points.length) {
      chart.append(sv("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#5b6475",
        "font-size": 13}, "no drift check yet: the window is filling"));
      return chart;
    }
    const xs = points.map((h) => h[0]);
    const ys = points.map((h) => (known(h[1]) ? h[1] : 0));
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
    const top = Math.max(...ys, known(threshold) ? threshold : 0, 1) * 1.15;
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => T + (1 - y / top) * (H - T - B);
    for (const v of [0, top / 2, top]) {  // score = -log10 p: 2 is p = 0.01
      chart.append(sv("line", {x1: L, x2: W - R, y1: py(v), y2: py(v), stroke: "#e3e7ee"}));
      chart.append(sv("text", {x: L - 6, y: py(v) + 4, "text-anchor": "end", fill: "#5b6475",
        "font-size": 11}, v.toPrecision(2)));
    }
    if (known(threshold)) {
      chart.append(sv("line", {x1: L, x2: W - R, y1: py(threshold), y2: py(threshold), stroke: "var(--alarm)",
        "stroke-dasharray": "5 4", "stroke-width": 1.5, class: "threshold"}));
      chart.append(sv("text", {x: W - R - 4, y: py(threshold) - 4, "text-anchor": "end", fill: "var(--alarm)",
        "font-size": 11}, "alarm"));
    }
    points.forEach((h, i) => {
      if (!h[2]) return;
      const a = px(h[0]), b = i + 1 < points.length ? px(points[i + 1][0]) : W - R;
      chart.append(sv("rect", {x: a, y: T, width: Math.max(3, b - a), height: H - T - B,
        fill: "rgba(198,40,40,.14)"}));
    });
    chart.append(sv("polyline", {fill: "none", stroke: "var(--score)", "stroke-width": 2,
      points: points.map((h, i) => `${px(h[0])},${py(ys[i])}`).join(" ")}));
    points.forEach((h, i) => {
      chart.append(sv("circle", {cx: px(h[0]), cy: py(ys[i]), r: h[2] ? 3.5 : 2,
        fill: h[2] ? "var(--alarm)" : "var(--score)"}));
    });
    chart.append(sv("text", {x: L, y: H - 8, fill: "#5b6475", "font-size": 11}, String(x0)));
    chart.append(sv("text", {x: W - R, y: H - 8, "text-anchor": "end", fill: "#5b6475", "font-size": 11},
      `${x1} requests`));
    return chart;
  }

  // Bars in [0, 1]: rows of [name, [[value, colour, caption], ...]].
  function bars(rows, label) {
    const W = 560, L = 130, R = 64, row = 12, gap = 10;
    const height = rows.reduce((h, [, values]) => h + values.length * row + gap, 6);
    const chart = sv("svg", {viewBox: `0 0 ${W} ${height}`, role: "img", "aria-label": label});
    let y = 4;
    for (const [name, values] of rows) {
      const mid = y + (values.length * row) / 2 + 4;
      const shown = name.length > 18 ? name.slice(0, 17) + "\\u2026" : name;
      chart.append(sv("text", {x: L - 8, y: mid, "text-anchor": "end", fill: "#1d2433", "font-size": 12},
        shown));
      for (const [value, colour, caption] of values) {
        chart.append(sv("rect", {x: L, y, width: W - L - R, height: row - 2, fill: "#f0f2f6"}));
        if (known(value)) {
          chart.append(sv("rect", {x: L, y, width: Math.max(1, value * (W - L - R)), height: row - 2,
            fill: colour}));
        }
        chart.append(sv("text", {x: W - R + 6, y: y + row - 3, fill: "#5b6475", "font-size": 11},
          caption));
        y += row;
      }
      y += gap;
    }
    return chart;
  }

  function section(title, ...children) {
    return el("div", {class: "section"}, el("h3", {}, title), ...children);
  }
  function legend(...items) {
    return el("div", {class: "legend"},
      ...items.map(([text, colour]) => el("span", {style: `--c: ${colour}`}, text)));
  }

  // A reason's `command` parts as code.
  function withCode(text) {
    const node = el("span");
    String(text || "").split("`").forEach((part, i) => node.append(i % 2 ? el("code", {}, part) : part));
    return node;
  }

  function labelSection(task) {
    const dist = task.label_distribution || {};
    const ref = dist.reference || {}, live = dist.live || {};
    const labels = [...new Set([...(task.labels || []), ...Object.keys(ref), ...Object.keys(live)])];
    if (!labels.length) return null;
    labels.sort((a, b) => (ref[b] || 0) - (ref[a] || 0));
    const shown = labels.slice(0, 12);
    const rows = shown.map((name) => [name, [
      [ref[name], "var(--ref)", pct(ref[name])],
      [live[name], "var(--live)", pct(live[name])],
    ]]);
    const more = labels.length > shown.length ? el("div", {class: "meta"},
      `and ${labels.length - shown.length} more labels`) : null;
    return section("Predicted labels: reference vs live", legend(["reference", "var(--ref)"],
      ["live window", "var(--live)"]), bars(rows, "label distribution"), more);
  }

  function accuracySection(task) {
    const live = task.live || {};
    const rows = [["estimated", [[task.estimated_accuracy, "var(--score)", pct(task.estimated_accuracy)]]]];
    if (known(task.reference_accuracy)) {
      rows.unshift(["validation", [[task.reference_accuracy, "var(--ref)", pct(task.reference_accuracy)]]]);
    }
    if (task.kind !== "generation") {
      rows.push([`live (${live.feedback || 0} fb)`, [[live.accuracy, "var(--ok)", pct(live.accuracy)]]]);
    }
    const notes = [];
    if (task.live === null || task.live === undefined) notes.push("no feedback store on this server");
    else if (!live.feedback) notes.push("no feedback yet: POST /v1/feedback with an answer's id");
    if (task.kind === "generation" && live.feedback) {
      notes.push(`mean rating ${num(live.mean_rating, 2)} over ${live.feedback} answers`);
    }
    return section("Accuracy: label-free estimate vs feedback", bars(rows, "accuracy"),
      notes.length ? el("div", {class: "meta"}, notes.join("; ")) : null);
  }

  function testsSection(tests) {
    const names = Object.keys(tests || {});
    if (!names.length) return null;
    const table = el("table", {class: "tests"},
      el("tr", {}, el("th", {}, "test"), el("th", {}, "statistic"), el("th", {}, "p-value"), el("th", {}, "")));
    for (const name of names) {
      const t = tests[name] || {};
      const stat = [t.statistic, t.score, t.stat, t.mmd2, t.distance].find(known);
      table.append(el("tr", {}, el("td", {}, name), el("td", {class: "num"}, num(stat)),
        el("td", {class: "num"}, pval(t.p_value)), el("td", {}, t.alarm || t.drift ? "drift" : "")));
    }
    return section("Tests on the window", table);
  }

  function card(name, task) {
    const drift = task.drift || {};
    const monitored = task.monitored === true;
    const alarm = monitored && drift.alarm === true;
    const state = !monitored ? "unmonitored" : alarm ? "alarm" : drift.window ? "ok" : "filling";
    const badge = {unmonitored: "unmonitored", alarm: "DRIFT ALARM", ok: "no drift",
      filling: "window filling"}[state];
    const node = el("section", {class: `card ${state}`, "data-task": name, "data-state": state},
      el("h2", {}, name, el("span", {class: `badge ${state}`}, badge)),
      el("div", {class: "meta"}, [task.kind, task.method, task.version ? `v${task.version}` : null,
        task.requests === null || task.requests === undefined ? null : `${task.requests} requests`]
        .filter(Boolean).join(" \\u00b7 ")));
    if (!monitored) {
      node.append(el("div", {class: "note"}, withCode(task.reason || "this task is not monitored")));
      if (task.live) node.append(accuracySection(task));
      return node;
    }
    node.append(el("div", {class: "meta"},
      `score ${num(drift.score, 4)} \\u00b7 p ${pval(drift.p_value)} \\u00b7 window ${drift.window || 0}` +
      ` \\u00b7 ${drift.alarms || 0} alarm episode(s)`));
    const unknown = task.unknown_rate;
    if (unknown && known(unknown.live)) {
      node.append(el("div", {class: "meta"},
        `unknown tokens: reference ${pct(unknown.reference)} \\u00b7 live ${pct(unknown.live)}`));
    }
    node.append(section("Drift score over time (\\u2212log10 p)", historyChart(task.history, drift.threshold)));
    const labels = task.kind === "generation" ? null : labelSection(task);
    if (labels) node.append(labels);
    node.append(accuracySection(task));
    const tests = testsSection(drift.tests);
    if (tests) node.append(tests);
    return node;
  }

  function show(message, isError) {
    $("message").textContent = message;
    $("message").className = isError ? "error" : "";
  }

  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try {
      const headers = key ? {Authorization: `Bearer ${key}`} : {};
      const reply = await fetch("/v1/monitor", {headers, cache: "no-store"});
      if (reply.status === 401) {
        show("This server needs its API key: type it in the key field above, or open /monitor?key=KEY.", true);
        $("status").textContent = "locked";
        return;  // no retry until a key is given
      }
      if (!reply.ok) throw new Error(`/v1/monitor answered ${reply.status}`);
      const body = await reply.json();
      const tasks = body.tasks || {};
      const names = Object.keys(tasks).sort();
      $("cards").replaceChildren(...names.map((name) => card(name, tasks[name])));
      const alarms = names.filter((n) => tasks[n].monitored && (tasks[n].drift || {}).alarm).length;
      $("status").textContent = `${names.length} task(s) \\u00b7 ${alarms} alarm(s)` +
        (body.enabled === false ? " \\u00b7 monitoring off" : "") +
        ` \\u00b7 updated ${new Date().toLocaleTimeString()}`;
      show(names.length ? "" : "This server serves no tasks.", false);
      document.body.dataset.loaded = "1";
    } catch (error) {
      show(`Could not read /v1/monitor (${error.message}); retrying.`, true);
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
})();
</script>
</body>
</html>
"""
