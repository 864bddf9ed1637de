"""The feedback store on its own: durable answers and feedback in SQLite and PostgreSQL, the later of two pieces
of feedback winning once, live quality equal to the offline metrics, retention, and the exports that the
training and preference commands read."""

from __future__ import annotations

import json
import random
import sys

import pytest

from multitune.errors import ConfigError, DataError
from multitune.health import store as store_module
from multitune.health.export import pairs_path
from multitune.health.store import BadLabel, BadRating, FeedbackStore, Retention, UnknownId
from multitune.metrics import accuracy, macro_f1
from multitune.preference.pairs import load_pairs
from multitune.tables import read_table

LABELS = ["neg", "pos", "neutral"]


def probabilities(label: str) -> dict[str, float]:
    return {name: (0.8 if name == label else 0.1) for name in LABELS}


def serve_rows(store: FeedbackStore, task: str, n: int, seed: int = 0, prefix: str = "a") -> list[tuple]:
    """``n`` answers recorded as the server records them; returns (id, prediction, truth) with a random truth."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prediction, truth = rng.choice(LABELS), rng.choice(LABELS)
        rid = f"{prefix}{i}"
        store.record(rid, task, "classification", prediction, probabilities(prediction), f"text {i}")
        rows.append((rid, prediction, truth))
    return rows


@pytest.fixture
def sqlite_store(tmp_path):
    store = FeedbackStore.open(tmp_path / "monitor.sqlite", log_requests=True)
    yield store
    store.close()


def test_live_accuracy_and_macro_f1_equal_the_offline_metrics_on_the_same_rows(sqlite_store):
    rows = serve_rows(sqlite_store, "sent", 60)
    for rid, _, truth in rows[:45]:  # 15 answers never get feedback: they must not count
        sqlite_store.feedback(rid, label=truth)
    live = sqlite_store.live("sent", window=10)
    predictions, truths = [p for _, p, _ in rows[:45]], [t for _, _, t in rows[:45]]
    assert live["feedback"] == 45
    assert live["accuracy"] == pytest.approx(accuracy(predictions, truths))
    assert live["macro_f1"] == pytest.approx(macro_f1(predictions, truths))
    last = rows[35:45]  # the window: the last 10 pieces of feedback
    assert live["window"]["feedback"] == 10
    assert live["window"]["accuracy"] == pytest.approx(
        accuracy([p for _, p, _ in last], [t for *_, t in last])
    )
    assert live["window"]["macro_f1"] == pytest.approx(
        macro_f1([p for _, p, _ in last], [t for *_, t in last])
    )
    assert 0 < live["accuracy"] < 1  # the random truths make this a real check, not 0 == 0


def test_duplicate_feedback_is_counted_once_and_the_later_one_wins(sqlite_store):
    sqlite_store.record("x", "sent", "classification", "pos", probabilities("pos"), "good")
    sqlite_store.feedback("x", label="neg")
    sqlite_store.feedback("x", label="pos")
    live = sqlite_store.live("sent")
    assert live["feedback"] == 1 and live["accuracy"] == 1.0
    assert [row["label"] for row in sqlite_store.rows("sent")] == ["pos"]


def test_a_task_without_feedback_reports_none(sqlite_store):
    serve_rows(sqlite_store, "sent", 3)
    live = sqlite_store.live("sent")
    assert live["feedback"] == 0 and live["accuracy"] is None and live["window"]["feedback"] == 0


def test_unknown_id_bad_label_and_bad_rating_name_the_fix(sqlite_store):
    sqlite_store.record("c", "sent", "classification", "pos", probabilities("pos"), "t")
    sqlite_store.record("g", "writer", "generation", "an answer", None, "a prompt")
    with pytest.raises(UnknownId, match="never served here") as error:
        sqlite_store.feedback("nope", label="pos")
    assert error.value.status == 404
    with pytest.raises(BadLabel, match="neg, pos, neutral") as error:
        sqlite_store.feedback("c", label="positive")
    assert error.value.status == 400 and error.value.field == "label"
    for rating in (1.5, -0.1, "high", True, float("nan")):
        with pytest.raises(BadRating, match="rating must be a number from 0") as error:
            sqlite_store.feedback("g", rating=rating)
        assert error.value.field == "rating"
    with pytest.raises(BadRating, match="send a rating"):
        sqlite_store.feedback("g")
    with pytest.raises(BadLabel, match="generation"):
        sqlite_store.feedback("g", label="pos")
    with pytest.raises(BadRating, match="classification"):
        sqlite_store.feedback("c", rating=1)
    assert sqlite_store.live("sent")["feedback"] == 0 and sqlite_store.live("writer")["feedback"] == 0


def test_generation_live_quality_is_ratings_and_corrections(sqlite_store):
    for i, rating in enumerate([1, 0.75, 0.0, 0.25]):
        sqlite_store.record(f"g{i}", "writer", "generation", f"answer {i}", None, f"prompt {i}")
        sqlite_store.feedback(f"g{i}", rating=rating, correction="better" if i == 2 else None)
    live = sqlite_store.live("writer")
    assert live["feedback"] == 4 and live["mean_rating"] == pytest.approx(0.5)
    assert live["good"] == pytest.approx(0.5) and live["corrections"] == 1


def test_feedback_and_live_accuracy_survive_a_reopen(tmp_path):
    path = tmp_path / "monitor.sqlite"
    store = FeedbackStore.open(path)
    rows = serve_rows(store, "sent", 20)
    for rid, _, truth in rows[:12]:
        store.feedback(rid, label=truth)
    before = store.live("sent")
    store.close()  # flushes: the 8 answers without feedback are written too
    again = FeedbackStore.open(path)
    try:
        assert again.live("sent") == before
        again.feedback(rows[15][0], label=rows[15][2])  # an answer from before the reopen takes feedback
        assert again.live("sent")["feedback"] == 13
    finally:
        again.close()


def test_inputs_are_kept_only_when_logged_and_export_says_which_flag(tmp_path):
    store = FeedbackStore.open(tmp_path / "m.sqlite")  # log_requests off, the default
    store.record("a", "sent", "classification", "pos", probabilities("pos"), "a secret input")
    store.feedback("a", label="neg")
    assert store.rows("sent")[0]["input"] is None
    with pytest.raises(DataError, match="--log-requests"):
        store.export("sent", tmp_path / "new.csv")
    with pytest.raises(DataError, match="no feedback for task 'other'.*tasks with answers: sent"):
        store.export("other", tmp_path / "new.csv")
    store.close()
    assert b"a secret input" not in (tmp_path / "m.sqlite").read_bytes()


def test_export_is_a_text_label_file_in_feedback_order(sqlite_store, tmp_path):
    rows = serve_rows(sqlite_store, "sent", 5)
    for rid, _, truth in reversed(rows):
        sqlite_store.feedback(rid, label=truth)
    assert sqlite_store.export("sent", tmp_path / "new.csv") == 5
    written = read_table(tmp_path / "new.csv")
    assert written == [{"text": f"text {i}", "label": rows[i][2]} for i in reversed(range(5))]


def test_preferences_export_kto_rows_and_dpo_pairs_the_dpo_command_reads(sqlite_store, tmp_path):
    for i in range(3):
        sqlite_store.record(f"g{i}", "writer", "generation", f"answer {i}", None, f"prompt {i}")
    sqlite_store.feedback("g0", rating=1)
    sqlite_store.feedback("g1", rating=0)
    sqlite_store.feedback("g2", rating=0.2, correction="the right answer")
    out = tmp_path / "prefs.jsonl"
    summary = sqlite_store.export_preferences("writer", out)
    assert summary == {"kto": 4, "pairs": 1, "pairs_path": str(pairs_path(out))}
    kto = [json.loads(line) for line in out.read_text().splitlines()]
    assert kto == [
        {"prompt": "prompt 0", "completion": "answer 0", "label": True},
        {"prompt": "prompt 1", "completion": "answer 1", "label": False},
        {"prompt": "prompt 2", "completion": "answer 2", "label": False},
        {"prompt": "prompt 2", "completion": "the right answer", "label": True},
    ]
    pairs = load_pairs(pairs_path(out))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("prompt 2", "the right answer", "answer 2")]
    sft = tmp_path / "sft.csv"  # generation --output: answers rated good and corrections
    assert sqlite_store.export("writer", sft) == 2
    assert read_table(sft) == [
        {"prompt": "prompt 0", "response": "answer 0"},
        {"prompt": "prompt 2", "response": "the right answer"},
    ]
    with pytest.raises(ConfigError, match="classification task; --preferences is for generation"):
        serve_rows(sqlite_store, "sent", 1)
        sqlite_store.feedback("a0", label="neg")
        sqlite_store.export_preferences("sent", out)


def test_retention_deletes_old_answers_without_feedback_and_their_ids_expire(tmp_path, monkeypatch):
    store = FeedbackStore.open(tmp_path / "m.sqlite", retention=Retention(rows=5))
    clock = iter(range(1_700_000_000, 1_800_000_000))  # today's epoch seconds: no room for an epsilon
    monkeypatch.setattr(store_module.time, "time", lambda: float(next(clock)))
    rows = serve_rows(store, "sent", 12)
    store.feedback(rows[0][0], label=rows[0][2])  # the oldest answer gets feedback: it is kept
    store.prune()
    for expired in (rows[3], rows[6]):  # rows[6] is the newest past the limit of 5
        with pytest.raises(UnknownId, match="--request-retention"):
            store.feedback(expired[0], label="pos")
    for kept_row in (rows[7], rows[11]):  # the newest 5: still there
        store.feedback(kept_row[0], label="pos")
    kept = {row["id"] for row in store.rows("sent")}
    assert kept == {rows[0][0], rows[7][0], rows[11][0]}
    assert store.live("sent")["feedback"] == 3
    store.close()


def test_retention_in_days(tmp_path, monkeypatch):
    now = {"t": 1_000_000.0}
    monkeypatch.setattr(store_module.time, "time", lambda: now["t"])
    store = FeedbackStore.open(tmp_path / "m.sqlite", retention="2d")
    store.record("old", "sent", "classification", "pos", probabilities("pos"), "t")
    store.flush()
    now["t"] += 3 * 86400
    store.record("new", "sent", "classification", "pos", probabilities("pos"), "t")
    store.prune()
    with pytest.raises(UnknownId):
        store.feedback("old", label="pos")
    store.feedback("new", label="pos")
    store.close()


@pytest.mark.parametrize("text", ["0", "-3", "ten", "2.5", "3w"])
def test_a_bad_retention_is_one_line_naming_both_forms(text):
    with pytest.raises(ConfigError, match=r"number of rows \(100000\)|whole number"):
        Retention.parse(text)


def test_retention_forms():
    assert Retention.parse("30d") == Retention(rows=None, days=30.0)
    assert Retention.parse("1000") == Retention(rows=1000, days=None)
    assert Retention.parse(None) == Retention()


def test_postgres_without_psycopg_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'multitune\[postgres\]'") as error:
        FeedbackStore.open("postgresql://me:secret@db.example/x")
    assert "secret" not in str(error.value)


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        FeedbackStore.open(tmp_path / "no" / "such" / "m.sqlite")


def test_close_commits_every_queued_answer(tmp_path):
    store = FeedbackStore.open(tmp_path / "m.sqlite")
    serve_rows(store, "sent", 300)
    store.close()
    again = FeedbackStore.open(tmp_path / "m.sqlite")
    assert again.tasks() == ["sent"]
    again.feedback("a299", label="pos")  # the last one queued is there
    again.close()


@pytest.fixture
def postgres_store_url(postgres_url):
    """The session's PostgreSQL database without this module's tables (other tests share the server)."""
    import psycopg

    with psycopg.connect(postgres_url) as connection:
        connection.execute("DROP TABLE IF EXISTS mt_feedback, mt_answers")
    return postgres_url


def test_two_stores_over_one_postgres_database_see_each_others_feedback(postgres_store_url):
    first = FeedbackStore.open(postgres_store_url, log_requests=True)
    second = FeedbackStore.open(postgres_store_url, log_requests=True)
    try:
        rows = serve_rows(first, "sent", 10, prefix="one-") + serve_rows(
            second, "sent", 10, seed=1, prefix="two-"
        )
        first.flush()
        second.flush()
        for rid, _, truth in rows[:5]:
            second.feedback(rid, label=truth)  # feedback on the other replica's answers
        for rid, _, truth in rows[10:15]:
            first.feedback(rid, label=truth)
        first.feedback(rows[0][0], label=rows[0][2])  # a duplicate, from the other replica: counted once
        labelled = rows[:5] + rows[10:15]
        expected = accuracy([p for _, p, _ in labelled], [t for *_, t in labelled])
        assert first.live("sent") == second.live("sent")
        assert first.live("sent")["feedback"] == 10
        assert first.live("sent")["accuracy"] == pytest.approx(expected)
        with pytest.raises(UnknownId):
            first.feedback("never", label="pos")
        with pytest.raises(BadLabel, match="neg, pos, neutral"):
            second.feedback(rows[1][0], label="nope")
    finally:
        first.close()
        second.close()
    again = FeedbackStore.open(postgres_store_url)
    try:
        assert again.live("sent")["feedback"] == 10
    finally:
        again.close()


def test_a_store_outlives_a_dropped_postgres_connection(postgres_store_url):
    """A database restart or failover drops the store's connections: the next write and read reconnect."""
    import psycopg

    store = FeedbackStore.open(postgres_store_url)
    try:
        serve_rows(store, "sent", 2)
        store.feedback("a0", label="pos")
        with psycopg.connect(postgres_store_url, autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert len(dropped) >= 2  # the writer's and the reader's connections
        store.feedback("a1", label="neg")
        assert store.live("sent")["feedback"] == 2
    finally:
        store.close()
