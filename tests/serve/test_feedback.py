"""Feedback over HTTP, on a real uvicorn on loopback: every answer carries an id recorded with its prediction,
POST /v1/feedback takes ground truth for it (404, 400 listing the labels, 400 naming the field), the later of two
pieces wins once, live accuracy equals the offline accuracy of the same rows, a restarted server (a new app over
the same SQLite file) keeps feedback and live accuracy, two servers over one PostgreSQL database see each other's
feedback, and ``multitune feedback export`` writes a file ``multitune train`` reads."""

from __future__ import annotations

import argparse
import json
import random

import httpx
import pytest
from helpers.fake_scheduler import NEGATIVE, POSITIVE, FakeScheduler
from test_server import KEY, assert_error, running, sse

from multitune.cli import main
from multitune.errors import ConfigError
from multitune.health.store import FeedbackStore
from multitune.metrics import accuracy, macro_f1
from multitune.serve import cli as server_module
from multitune.serve.app import create_app

WORDS = sorted(POSITIVE) + sorted(NEGATIVE) + ["plain", "words"]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "bank" / "monitor.sqlite"


def served(store: FeedbackStore, **kwargs):
    """A server over the fake scheduler whose answers go to ``store`` (closed when the server stops)."""
    return running(create_app(FakeScheduler(queue_size=64), model_name="tiny", store=store, **kwargs))


def classify(http: httpx.Client, texts: list[str]) -> list[dict]:
    reply = http.post("/v1/classify", json={"model": "sentiment", "input": texts})
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def test_every_answer_carries_an_id_that_takes_feedback(store_path):
    store_path.parent.mkdir()
    store = FeedbackStore.open(store_path, log_requests=True)
    with served(store) as base, httpx.Client(base_url=base, timeout=10) as http:
        rows = classify(http, ["good good", "bad", "plain"])
        ids = [row["id"] for row in rows]
        assert len(set(ids)) == 3 and all(isinstance(i, str) and i for i in ids)
        assert [row["index"] for row in rows] == [0, 1, 2] and rows[0]["label"] == "pos"
        completion = http.post("/v1/completions", json={"model": "echo", "prompt": "a b"}).json()
        chat = http.post(
            "/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": "c d"}]}
        ).json()
        with http.stream(
            "POST", "/v1/completions", json={"model": "echo", "prompt": "e f g", "stream": True}
        ) as reply:
            chunks = [json.loads(p) for p in sse(reply.iter_lines())[:-1]]
        streamed = chunks[0]["id"]
        assert {c["id"] for c in chunks} == {streamed}
        for rid, body in (
            (ids[0], {"label": "neg"}),
            (completion["id"], {"rating": 1}),
            (chat["id"], {"rating": 0, "correction": "d c!"}),
            (streamed, {"correction": "g f e"}),
        ):
            reply = http.post("/v1/feedback", json={"id": rid, **body})
            assert reply.status_code == 200, reply.text
            assert reply.json()["recorded"] is True and reply.json()["id"] == rid
        assert store.live("sentiment")["feedback"] == 1 and store.live("sentiment")["accuracy"] == 0.0
        writer = store.live("echo")
        assert writer["feedback"] == 3 and writer["corrections"] == 2 and writer["mean_rating"] == 0.5
        answers = {row["id"]: row for row in store.rows("echo")}
        assert answers[streamed]["prediction"] == "g f e" and answers[streamed]["input"] == "e f g"
        assert answers[chat["id"]]["input"] == "c d" and answers[chat["id"]]["prediction"] == "d c"


def test_bad_feedback_is_a_4xx_naming_the_fix(store_path):
    store_path.parent.mkdir()
    with served(FeedbackStore.open(store_path)) as base, httpx.Client(base_url=base, timeout=10) as http:
        rid = classify(http, ["good"])[0]["id"]
        gen = http.post("/v1/completions", json={"model": "echo", "prompt": "x"}).json()["id"]
        assert_error(http.post("/v1/feedback", json={"id": "cls-nope", "label": "pos"}), 404, "cls-nope")
        message = assert_error(http.post("/v1/feedback", json={"id": rid, "label": "positive"}), 400)
        assert "'positive'" in message and "neg, pos" in message
        reply = http.post("/v1/feedback", json={"id": gen, "rating": "great"})
        assert_error(reply, 400, "rating must be a number from 0")
        assert reply.json()["error"]["param"] == "rating"
        assert_error(http.post("/v1/feedback", json={"id": gen, "rating": 7}), 400, "rating")
        assert_error(http.post("/v1/feedback", json={"id": gen}), 400, "send a rating")
        assert_error(http.post("/v1/feedback", json={"id": rid, "rating": 1}), 400, "label")
        assert_error(http.post("/v1/feedback", json={"label": "pos"}), 400, "id is required")
        assert_error(http.post("/v1/feedback", json=["x"]), 400)
        assert http.post("/v1/feedback", json={"id": rid, "label": "pos"}).status_code == 200


def test_duplicate_feedback_counts_once_and_the_later_wins(store_path):
    store_path.parent.mkdir()
    store = FeedbackStore.open(store_path)
    with served(store) as base, httpx.Client(base_url=base, timeout=10) as http:
        rid = classify(http, ["good"])[0]["id"]  # predicted pos
        for label in ("neg", "neg", "pos"):
            assert http.post("/v1/feedback", json={"id": rid, "label": label}).status_code == 200
        live = store.live("sentiment")
        assert live["feedback"] == 1 and live["accuracy"] == 1.0


def test_live_accuracy_equals_the_offline_accuracy_and_survives_a_restart(store_path):
    store_path.parent.mkdir()
    rng = random.Random(0)
    texts = [sentence(rng) for _ in range(40)]
    truths = [rng.choice(["neg", "pos"]) for _ in texts]
    store = FeedbackStore.open(store_path)
    with served(store) as base, httpx.Client(base_url=base, timeout=10) as http:
        rows = classify(http, texts[:25]) + classify(http, texts[25:])
        for row, truth in zip(rows[:30], truths, strict=False):
            assert http.post("/v1/feedback", json={"id": row["id"], "label": truth}).status_code == 200
        before = store.live("sentiment", window=8)
    predictions = [row["label"] for row in rows[:30]]
    assert before["feedback"] == 30
    assert before["accuracy"] == pytest.approx(accuracy(predictions, truths[:30]))
    assert before["macro_f1"] == pytest.approx(macro_f1(predictions, truths[:30]))
    assert before["window"]["accuracy"] == pytest.approx(accuracy(predictions[22:], truths[22:30]))
    assert 0 < before["accuracy"] < 1

    restarted = FeedbackStore.open(store_path)  # the first server stopped: a new app over the same file
    with served(restarted) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert restarted.live("sentiment", window=8) == before
        # an answer of the first server that got no feedback before the restart takes it now
        reply = http.post("/v1/feedback", json={"id": rows[35]["id"], "label": truths[35]})
        assert reply.status_code == 200, reply.text
        assert restarted.live("sentiment")["feedback"] == 31


def test_two_servers_over_one_postgres_database_see_each_others_feedback(postgres_url):
    import psycopg

    with psycopg.connect(postgres_url) as connection:
        connection.execute("DROP TABLE IF EXISTS mt_feedback, mt_answers")
    one, two = FeedbackStore.open(postgres_url), FeedbackStore.open(postgres_url)
    with (
        served(one) as first,
        served(two) as second,
        httpx.Client(base_url=first, timeout=10) as a,
        httpx.Client(base_url=second, timeout=10) as b,
    ):
        rows = classify(a, ["good", "bad", "good nice"])
        one.flush()  # the answers are queued on replica one's writer; feedback may reach replica two first
        for row, truth in zip(rows, ["pos", "pos", "neg"], strict=True):
            assert b.post("/v1/feedback", json={"id": row["id"], "label": truth}).status_code == 200
        other = classify(b, ["sad"])[0]
        two.flush()
        assert a.post("/v1/feedback", json={"id": other["id"], "label": "neg"}).status_code == 200
        assert one.live("sentiment") == two.live("sentiment")
        assert one.live("sentiment")["feedback"] == 4 and one.live("sentiment")["accuracy"] == 0.5
        assert_error(b.post("/v1/feedback", json={"id": rows[0]["id"], "label": "meh"}), 400, "neg, pos")


def test_the_api_key_guards_feedback(store_path):
    store_path.parent.mkdir()
    with served(FeedbackStore.open(store_path), api_key=KEY) as base, httpx.Client(base_url=base) as http:
        auth = {"Authorization": f"Bearer {KEY}"}
        reply = http.post("/v1/classify", json={"model": "sentiment", "input": "good"}, headers=auth)
        rid = reply.json()["data"][0]["id"]
        assert_error(http.post("/v1/feedback", json={"id": rid, "label": "pos"}), 401, "--api-key")
        assert http.post("/v1/feedback", json={"id": rid, "label": "pos"}, headers=auth).status_code == 200


def test_a_server_without_a_store_still_gives_ids_and_says_feedback_is_not_kept():
    with running(create_app(FakeScheduler())) as base, httpx.Client(base_url=base, timeout=10) as http:
        rid = classify(http, ["good"])[0]["id"]
        assert_error(http.post("/v1/feedback", json={"id": rid, "label": "pos"}), 404, "no feedback store")


def test_serve_flags_reach_the_store(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    server_module.add_serve_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path), "--monitor-db", "postgresql://db/x", "--log-requests", "--request-retention", "30d"]
    )
    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda paths, **kwargs: seen.update(kwargs))
    server_module.cmd_serve(args)
    assert seen["monitor_db"] == "postgresql://db/x" and seen["log_requests"] is True
    assert seen["request_retention"] == "30d"
    assert parser.parse_args([str(tmp_path)]).log_requests is False  # inputs are not stored by default
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--request-retention"):
        server_module.serve(tmp_path, port=0, request_retention="forever")


def test_serve_keeps_its_store_in_the_first_served_folder(tmp_path, monkeypatch):
    from multitune.serve.engine import Engine

    def load(*args, **kwargs):
        raise ConfigError("stop here")

    monkeypatch.setattr(Engine, "from_folder", staticmethod(load))
    with pytest.raises(ConfigError, match="stop here"):
        server_module.serve([tmp_path, tmp_path], port=0)
    assert (tmp_path / "monitor.sqlite").is_file()


def test_export_writes_a_file_train_reads(tmp_path, bert_dir, capsys):
    """The whole loop on a tiny BERT: serve a trained task with --log-requests, label its answers, export them,
    and train the next version on the export."""
    from multitune.serve.engine import Engine
    from multitune.serve.scheduler import Scheduler, in_passing_thread

    rng = random.Random(1)
    data = tmp_path / "data.csv"
    rows = [(sentence(rng), "pos") for _ in range(12)] + [(sentence(rng), "neg") for _ in range(12)]
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    run = tmp_path / "bank" / "sent"
    assert main(["train", "--model", str(bert_dir), "--data", str(data), "--output", str(run), "--quiet",
                 "--epochs", "1"]) == 0  # fmt: skip
    bank = tmp_path / "bank"
    engine = in_passing_thread(lambda: Engine.from_folder(bank, device="cpu"))
    store = FeedbackStore.open(FeedbackStore.default_path([bank]), log_requests=True)
    texts = [sentence(rng) for _ in range(16)]
    with (
        running(create_app(Scheduler(engine, max_batch_size=8), store=store)) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        answers = http.post("/v1/classify", json={"model": "sent", "input": texts}).json()["data"]
        for i, answer in enumerate(answers):
            label = "pos" if i % 2 else "neg"
            assert http.post("/v1/feedback", json={"id": answer["id"], "label": label}).status_code == 200
    capsys.readouterr()
    new = tmp_path / "new.csv"
    assert main(["feedback", "export", str(bank), "--task", "sent", "--output", str(new)]) == 0
    assert "wrote 16 rows of task 'sent'" in capsys.readouterr().err
    lines = new.read_text().splitlines()
    assert lines[0] == "text,label" and len(lines) == 17
    assert main(["train", "--model", str(bert_dir), "--data", str(new), "--output", str(tmp_path / "next"),
                 "--quiet", "--epochs", "1"]) == 0  # fmt: skip
    assert (tmp_path / "next" / "adapter" / "adapter.json").is_file()


def test_export_errors_are_one_line_naming_the_fix(tmp_path, capsys):
    bank = tmp_path / "bank"
    bank.mkdir()
    assert main(["feedback", "export", str(bank), "--task", "t", "--output", str(tmp_path / "o.csv")]) == 2
    assert "no server has recorded feedback" in capsys.readouterr().err
    store = FeedbackStore.open(FeedbackStore.default_path([bank]))  # inputs not logged
    store.record("a", "t", "classification", "x", {"x": 1.0, "y": 0.0}, "secret")
    store.feedback("a", label="y")
    store.close()
    assert main(["feedback", "export", str(bank), "--task", "t", "--output", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log-requests" in err[0] and err[0].startswith("error: ")
    assert main(["feedback", "export", str(bank), "--task", "t"]) == 2
    assert "--output FILE" in capsys.readouterr().err
