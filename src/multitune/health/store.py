"""The feedback store: what the server answered, what people said the answer should have been, and live quality.

Two tables, in SQLite (stdlib ``sqlite3``; by default ``BANK/monitor.sqlite``) or PostgreSQL (psycopg 3,
``--monitor-db postgresql://...``, so that several replicas of a server share one store):

- ``mt_answers`` (id, task, kind, time, prediction, probabilities as JSON, the input text): one row per served
  classification row or generation. The input is kept only with ``log_requests`` (``--log-requests``; off by
  default). :class:`Retention` (``--request-retention``, rows or days) deletes old answers that got no feedback;
  an answer with feedback is a labelled example and is kept, with its input when one was logged.
- ``mt_feedback`` (id, label | rating + correction, time): one row per answer. Feedback for an id that has some
  already replaces it (an upsert): the later one wins, and it is counted once.

Why writes never slow serving: :meth:`FeedbackStore.record` only puts the row on a queue; one writer thread owns
the writing connection and commits whatever is queued in one transaction. Feedback goes through the same queue
and the caller waits for its commit, so (a) feedback never overtakes the answer it is about, (b) an
acknowledged piece of feedback is on disk (SQLite in WAL mode with ``synchronous=FULL``; PostgreSQL's commit),
and (c) SQLite sees a single writer. :meth:`FeedbackStore.close` flushes the queue (the server's shutdown).

Live quality (:meth:`FeedbackStore.live`): accuracy and macro-F1 (:mod:`multitune.metrics`' definitions) of the
predictions against the feedback labels, over all the task's feedback and over the last ``window`` pieces of it;
for generation tasks the mean rating and the share rated good (rating >= 0.5). Counts come from the database,
so every replica reports the same numbers and a restart changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitune.errors import ConfigError, MultituneError
from multitune.metrics import accuracy, macro_f1

log = logging.getLogger("multitune.health.store")

STORE_FILE = "monitor.sqlite"  # inside the first served folder
DEFAULT_WINDOW = 500  # feedback pieces in the live window
DEFAULT_RETENTION_ROWS = 1_000_000  # answers kept without feedback (a few hundred MB at most)
BATCH = 512  # answers committed in one transaction at most
PRUNE_EVERY = 2048  # answers recorded between two retention passes
KINDS = ("classification", "generation")
GOOD = 0.5  # a rating at or above it marks a desirable answer (KTO's label True)
INSTALL_POSTGRES = "pip install 'multitune[postgres]'"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS mt_answers (id TEXT PRIMARY KEY, task TEXT NOT NULL, kind TEXT NOT NULL, "
    "time DOUBLE PRECISION NOT NULL, prediction TEXT, probabilities TEXT, input TEXT)",
    "CREATE INDEX IF NOT EXISTS mt_answers_task_time ON mt_answers (task, time)",
    "CREATE INDEX IF NOT EXISTS mt_answers_time ON mt_answers (time)",
    "CREATE TABLE IF NOT EXISTS mt_feedback (id TEXT PRIMARY KEY, label TEXT, rating DOUBLE PRECISION, "
    "correction TEXT, time DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS mt_feedback_time ON mt_feedback (time)",
)


# ---- errors ------------------------------------------------------------------------------------------------
class FeedbackError(MultituneError):
    """Feedback the store cannot take; ``status`` is the HTTP status it answers, ``field`` the field at fault."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownId(FeedbackError):
    """No answer with this id: never served by this store, or deleted by the retention limit."""

    status = 404


class BadLabel(FeedbackError):
    """A label outside the task's set."""


class BadRating(FeedbackError):
    """A rating that is not a number from 0 to 1, or feedback of the wrong shape for the task's kind."""


# ---- retention ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """How long answers without feedback are kept: the newest ``rows`` of them, or those of the last ``days``."""

    rows: int | None = DEFAULT_RETENTION_ROWS
    days: float | None = None

    @classmethod
    def parse(cls, text: str | int | None) -> Retention:
        """``"100000"`` (rows) or ``"30d"`` (days); None is the default."""
        if text is None:
            return cls()
        value = str(text).strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(d|days?)?", value)
        if match is None or float(match.group(1)) <= 0:
            raise ConfigError(
                f"--request-retention {text!r} is neither a number of rows (100000) nor of days (30d); "
                "give one, above 0"
            )
        number = float(match.group(1))
        if match.group(2):
            return cls(rows=None, days=number)
        if not number.is_integer():
            raise ConfigError(
                f"--request-retention {text!r}: a number of rows is a whole number (or add 'd')"
            )
        return cls(rows=int(number), days=None)


# ---- the database ------------------------------------------------------------------------------------------
class _Database:
    """One backend's connections and SQL dialect: queries are written with ``?`` and translated for psycopg."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.postgres = target.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"--monitor-db {_redacted(target)} needs the psycopg package; {INSTALL_POSTGRES}"
                ) from None
        else:
            parent = Path(target).parent
            if target != ":memory:" and not parent.is_dir():
                raise ConfigError(f"feedback store {target}: folder {parent} does not exist; create it first")

    def connect(self) -> Any:
        if self.postgres:
            import psycopg

            try:
                return psycopg.connect(self.target)
            except psycopg.Error as error:
                first = " ".join(str(error).split())[:200]
                raise ConfigError(
                    f"cannot connect to --monitor-db {_redacted(self.target)} ({first}); check the URL "
                    "and that the server runs"
                ) from None
        try:
            connection = sqlite3.connect(self.target, timeout=30, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            connection.execute("PRAGMA synchronous=FULL")  # an acknowledged commit survives a power cut
        except sqlite3.Error as error:
            raise ConfigError(
                f"the feedback store {self.target} cannot be opened as SQLite ({error}); pass --monitor-db "
                "with a writable file or a postgresql:// URL"
            ) from None
        return connection

    def sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.postgres else query


def _redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# ---- the store ---------------------------------------------------------------------------------------------
class FeedbackStore:
    """Answers and feedback of every served task, durable, shared by the replicas that open the same database.

    Thread-safe: :meth:`record` from any thread (it only queues), :meth:`feedback`, :meth:`live` and the
    exports from any thread (they block; call them off an event loop).
    """

    def __init__(
        self,
        target: str | Path,
        *,
        log_requests: bool = False,
        retention: Retention | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < 1:
            raise ConfigError(f"the live window must hold at least 1 piece of feedback (got {window})")
        self.target = str(target)
        self.log_requests = log_requests
        self.retention = retention or Retention()
        self.window = window
        self._db = _Database(self.target)
        self._writer_db = self._db.connect()
        self._migrate(self._writer_db)
        # ":memory:" is one database per connection: readers share the writer's (under the lock)
        self._reader = self._writer_db if self.target == ":memory:" else self._db.connect()
        self._read_lock = threading.Lock() if self._reader is not self._writer_db else None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._since_prune = 0
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="multitune-feedback-store", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls,
        url_or_path: str | Path,
        *,
        log_requests: bool = False,
        retention: Retention | str | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> FeedbackStore:
        """A store over a SQLite file (created when missing) or a ``postgresql://`` URL."""
        if not isinstance(retention, Retention):
            retention = Retention.parse(retention)
        return cls(url_or_path, log_requests=log_requests, retention=retention, window=window)

    @staticmethod
    def default_path(paths: Sequence[str | Path]) -> Path:
        """Where ``multitune serve`` keeps its store without ``--monitor-db``: in the first served folder."""
        return Path(paths[0]) / STORE_FILE

    def _migrate(self, connection: Any) -> None:
        with _transaction(connection):
            cursor = connection.cursor()
            for statement in SCHEMA:
                cursor.execute(statement)

    # ---- writing ---------------------------------------------------------------------------------------
    def record(
        self,
        id: str,
        task: str,
        kind: str,
        prediction: str | None,
        probabilities: dict[str, float] | None = None,
        input_text: str | None = None,
    ) -> None:
        """Queue one served answer (committed by the writer thread within moments; never blocks)."""
        if self._closed:
            return
        probs = None if probabilities is None else json.dumps(probabilities, separators=(",", ":"))
        text = input_text if self.log_requests else None
        self._queue.put(("answer", (id, task, kind, time.time(), prediction, probs, text)))

    def feedback(
        self,
        id: str,
        label: str | None = None,
        rating: float | None = None,
        correction: str | None = None,
    ) -> dict[str, Any]:
        """Record ground truth for answer ``id``, durably before returning (the later of two pieces wins).

        Classification takes ``label`` (one of the task's); generation takes ``rating`` (0 bad .. 1 good)
        and/or ``correction`` (the answer it should have been). Returns the answer's task and kind."""
        return self._call(lambda connection: self._write_feedback(connection, id, label, rating, correction))

    def _write_feedback(
        self, connection: Any, id: str, label: str | None, rating: float | None, correction: str | None
    ) -> dict[str, Any]:
        cursor = connection.cursor()
        cursor.execute(self._db.sql("SELECT task, kind, probabilities FROM mt_answers WHERE id = ?"), (id,))
        row = cursor.fetchone()
        if row is None:
            raise UnknownId(
                f"no answer with id {id!r}: it was never served here or is older than the server's "
                "--request-retention; send the id of a recent answer",
                "id",
            )
        task, kind, probabilities = row
        label, rating, correction = _checked(kind, probabilities, label, rating, correction)
        cursor.execute(
            self._db.sql(
                "INSERT INTO mt_feedback (id, label, rating, correction, time) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET label = excluded.label, rating = excluded.rating, "
                "correction = excluded.correction, time = excluded.time"
            ),
            (id, label, rating, correction, time.time()),
        )
        return {"id": id, "task": task, "kind": kind}

    def flush(self) -> None:
        """Return once every answer queued before the call is committed."""
        self._call(lambda connection: None)

    def close(self) -> None:
        """Commit what is queued and stop the writer (idempotent)."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(("stop", None))
        self._thread.join(timeout=60)
        for connection in {id(c): c for c in (self._reader, self._writer_db)}.values():
            connection.close()

    def _call(self, operation: Callable[[Any], Any]) -> Any:
        """Run ``operation(connection)`` on the writer thread, after the answers queued before it, and wait for
        its commit."""
        if self._closed:
            raise ConfigError("the feedback store is closed; open it again")
        future: Future = Future()
        self._queue.put(("call", (operation, future)))
        return future.result()

    def _write_loop(self) -> None:
        """The writer thread: take everything queued, write it in one transaction, answer the waiting calls."""
        while True:
            items = [self._queue.get()]
            while len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            answers = [row for kind, row in items if kind == "answer"]
            if answers:
                self._write_answers(answers)
            for kind, payload in items:
                if kind == "call":
                    self._run_call(*payload)
            if any(kind == "stop" for kind, _ in items):
                return

    def _write_answers(self, rows: list[tuple]) -> None:
        def insert(connection: Any) -> None:
            connection.cursor().executemany(
                self._db.sql(
                    "INSERT INTO mt_answers (id, task, kind, time, prediction, probabilities, input) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
                ),
                rows,
            )
            self._since_prune += len(rows)
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                self._prune(connection.cursor())

        try:
            self._on_writer(insert)
        except Exception:  # noqa: BLE001  (a failed write loses answers' records, never the server)
            log.exception("writing %d answers to the feedback store failed", len(rows))

    def _run_call(self, operation: Callable[[Any], Any], future: Future) -> None:
        try:
            result = self._on_writer(operation)
        except BaseException as error:  # noqa: BLE001  (the caller gets it)
            future.set_exception(error)
        else:
            future.set_result(result)

    def _on_writer(self, operation: Callable[[Any], Any]) -> Any:
        """``operation(connection)`` in one transaction of the writing connection. A PostgreSQL connection the
        server dropped (a restart, a failover, an idle timeout) is replaced and the operation run once more."""
        try:
            with _transaction(self._writer_db):
                return operation(self._writer_db)
        except Exception:
            if not (self._db.postgres and self._writer_db.closed):
                raise
        self._writer_db = self._db.connect()
        with _transaction(self._writer_db):
            return operation(self._writer_db)

    def prune(self) -> None:
        """Apply the retention limit now (the writer does every few thousand answers)."""
        self._call(lambda connection: self._prune(connection.cursor()))

    def _prune(self, cursor: Any) -> None:
        """Delete answers beyond the retention limit that got no feedback (labelled answers are kept)."""
        cutoff, older = None, "<"
        if self.retention.days is not None:
            cutoff = time.time() - self.retention.days * 86400
        elif self.retention.rows is not None:
            cursor.execute(
                self._db.sql("SELECT time FROM mt_answers ORDER BY time DESC LIMIT 1 OFFSET ?"),
                (self.retention.rows,),
            )
            row = cursor.fetchone()
            cutoff, older = (None if row is None else float(row[0])), "<="  # the first row past the limit
        if cutoff is not None:
            cursor.execute(
                self._db.sql(
                    f"DELETE FROM mt_answers WHERE time {older} ? AND NOT EXISTS "
                    "(SELECT 1 FROM mt_feedback f WHERE f.id = mt_answers.id)"
                ),
                (cutoff,),
            )

    # ---- reading ---------------------------------------------------------------------------------------
    def _read(self, query: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        sql = self._db.sql(query)
        if self._read_lock is None:  # ":memory:": the writer's connection, on the writer thread
            return self._call(lambda connection: _fetch(connection, sql, parameters))
        with self._read_lock:
            try:
                with _transaction(self._reader):
                    return _fetch(self._reader, sql, parameters)
            except Exception:
                if not (self._db.postgres and self._reader.closed):
                    raise
            self._reader = self._db.connect()  # dropped by the server: as _on_writer does
            with _transaction(self._reader):
                return _fetch(self._reader, sql, parameters)

    def live(self, task: str, window: int | None = None) -> dict[str, Any]:
        """The task's live quality from feedback: over all of it, and over the last ``window`` pieces.

        ``{"feedback": n, "accuracy", "macro_f1", "window": {"size", "feedback", "accuracy", "macro_f1"}}`` for
        classification (None where there is no feedback yet); generation has ``mean_rating``, ``good`` (the
        share rated >= 0.5) and ``corrections`` in place of accuracy and macro-F1."""
        size = self.window if window is None else window
        if size < 1:
            raise ConfigError(f"the live window must hold at least 1 piece of feedback (got {size})")
        base = (
            "SELECT a.kind, a.prediction, f.label, f.rating, f.correction FROM mt_feedback f "
            "JOIN mt_answers a ON a.id = f.id WHERE a.task = ?"
        )
        everything = self._read(
            "SELECT kind, prediction, label, rating, correction, COUNT(*) FROM (" + base + ") AS t "
            "GROUP BY kind, prediction, label, rating, correction",
            (task,),
        )
        recent = self._read(base + " ORDER BY f.time DESC, f.id DESC LIMIT ?", (task, size))
        kind = everything[0][0] if everything else None
        summary = _quality(kind, ((row[1:5], int(row[5])) for row in everything))
        summary["kind"] = kind
        summary["window"] = {"size": size, **_quality(kind, ((row[1:5], 1) for row in recent))}
        return summary

    def rows(self, task: str) -> list[dict[str, Any]]:
        """Every answer of ``task`` that got feedback, oldest feedback first (what the exports read)."""
        self.flush()
        found = self._read(
            "SELECT a.id, a.kind, a.input, a.prediction, f.label, f.rating, f.correction FROM mt_feedback f "
            "JOIN mt_answers a ON a.id = f.id WHERE a.task = ? ORDER BY f.time, f.id",
            (task,),
        )
        keys = ("id", "kind", "input", "prediction", "label", "rating", "correction")
        return [dict(zip(keys, row, strict=True)) for row in found]

    def tasks(self) -> list[str]:
        """The tasks that have answers in the store."""
        self.flush()
        return [row[0] for row in self._read("SELECT DISTINCT task FROM mt_answers ORDER BY task")]

    def export(self, task: str, path: str | Path) -> int:
        """The task's labelled answers as a ``text,label`` training file (what ``train`` reads); returns rows."""
        from multitune.health.export import export_classification

        return export_classification(self, task, path)

    def export_preferences(self, task: str, path: str | Path) -> dict[str, int]:
        """The task's rated and corrected answers as preference data (KTO rows and DPO pairs); returns counts."""
        from multitune.health.export import export_preferences

        return export_preferences(self, task, path)


class _transaction:
    """Commit on success, roll back on failure, for sqlite3 and psycopg connections alike."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def __enter__(self) -> Any:
        return self.connection

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is None:
            self.connection.commit()
        else:
            with contextlib.suppress(
                Exception
            ):  # a dropped connection cannot roll back: the error is the news
                self.connection.rollback()


def _fetch(connection: Any, query: str, parameters: Sequence[Any]) -> list[tuple]:
    cursor = connection.cursor()
    cursor.execute(query, tuple(parameters))
    return [tuple(row) for row in cursor.fetchall()]


# ---- checks and sums ---------------------------------------------------------------------------------------
def _checked(
    kind: str, probabilities: str | None, label: Any, rating: Any, correction: Any
) -> tuple[str | None, float | None, str | None]:
    """The feedback as stored, after the checks its answer's kind asks for (each error names the field)."""
    if kind == "classification":
        if rating is not None or correction is not None:
            raise BadRating(
                "this answer is a classification: send {'id', 'label'} (rating and correction are for "
                "generations)",
                "rating" if rating is not None else "correction",
            )
        labels = list(json.loads(probabilities)) if probabilities else []
        if not isinstance(label, str) or not label or (labels and label not in labels):
            raise BadLabel(
                f"label {label!r} is not one of the task's labels ({', '.join(labels)}); send one of them",
                "label",
            )
        return label, None, None
    if label is not None:
        raise BadLabel(
            "this answer is a generation: send {'id', 'rating', 'correction'} (label is for classifications)",
            "label",
        )
    if rating is None and correction is None:
        raise BadRating(
            "send a rating (0 bad .. 1 good) and/or a correction (the answer it should have been)", "rating"
        )
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, int | float) or not 0 <= float(rating) <= 1:
            raise BadRating(f"rating must be a number from 0 (bad) to 1 (good) (got {rating!r})", "rating")
        rating = float(rating)
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        raise BadRating("correction must be the text the answer should have been (non-empty)", "correction")
    return None, rating, correction


def _quality(kind: str | None, rows: Iterable[tuple[tuple, int]]) -> dict[str, Any]:
    """Quality of (prediction, label, rating, correction) rows, each with its count."""
    rows = list(rows)
    n = sum(count for _, count in rows)
    if kind == "generation":
        ratings = [(float(r[2]), count) for r, count in rows if r[2] is not None]
        rated = sum(count for _, count in ratings)
        return {
            "feedback": n,
            "mean_rating": sum(v * c for v, c in ratings) / rated if rated else None,
            "good": sum(c for v, c in ratings if v >= GOOD) / rated if rated else None,
            "corrections": sum(count for r, count in rows if r[3] is not None),
        }
    predictions = [str(r[0]) for r, count in rows for _ in range(count)]
    truths = [str(r[1]) for r, count in rows for _ in range(count)]
    if not predictions:
        return {"feedback": 0, "accuracy": None, "macro_f1": None}
    # the offline definitions, on the same rows: live and offline numbers agree by construction
    return {
        "feedback": n,
        "accuracy": accuracy(predictions, truths),
        "macro_f1": macro_f1(predictions, truths),
    }


__all__ = [
    "BadLabel",
    "BadRating",
    "FeedbackError",
    "FeedbackStore",
    "Retention",
    "UnknownId",
]
