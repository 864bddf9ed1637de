"""One Optuna study shared by two worker processes through a real PostgreSQL server on loopback.

This is what ``multitune compare --storage postgresql://...`` relies on: several workers, each with its own
connection, draw trials from one study and none is lost or numbered twice. The server comes from the
session fixture ``postgres_url`` (tests/pg.py), which skips when the PostgreSQL binaries are absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

psycopg = pytest.importorskip("psycopg")  # the driver SQLAlchemy 2.1 uses for postgresql://
optuna = pytest.importorskip("optuna")

TARGET = 8
WORKERS = ("alpha", "beta")

# Each worker opens the study, says it is ready, waits for the shared "go" file (so that neither finishes the
# study while the other is still importing optuna), then runs one trial at a time until the study holds
# TARGET trials. It prints the numbers of the trials it ran, for the test to compare with the database.
WORKER = """
import json, sys, time
from pathlib import Path

import optuna

url, name, target, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="shared", storage=url, load_if_exists=True, direction="maximize")
(folder / f"ready-{name}").touch()
deadline = time.monotonic() + 60
while not (folder / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.01)

mine = []

def objective(trial):
    trial.set_user_attr("worker", name)
    mine.append(trial.number)
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(0.1)  # a trial that takes a moment, so the two workers interleave
    return -x * x

counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
while len(study.get_trials(deepcopy=False, states=counted)) < target:
    study.optimize(objective, n_trials=1)
print(json.dumps(mine))
"""


def test_server_is_postgres_on_loopback(postgres_url):
    """The fixture must give a real PostgreSQL reached over TCP on 127.0.0.1, so a broken setup fails here."""
    with psycopg.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("select version(), current_database(), current_user, host(inet_server_addr())")
        version, database, user, address = cur.fetchone()
        cur.execute("show listen_addresses")
        (listen,) = cur.fetchone()
    conn.close()
    assert "PostgreSQL" in version
    assert (database, user, address, listen) == ("multitune", "mt", "127.0.0.1", "127.0.0.1")


def test_two_workers_share_one_study(postgres_url, tmp_path):
    url = postgres_url
    # Create the study (and with it Optuna's tables) here first: two processes creating the schema of a fresh
    # database at the same moment can collide.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="shared", storage=url, direction="maximize")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), url, name, str(TARGET), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in WORKERS
    }
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{name}").exists() for name in WORKERS):
            failed = {name: proc.returncode for name, proc in procs.items() if proc.poll() is not None}
            assert not failed, f"worker exited before it was ready: {failed}"
            assert time.monotonic() < deadline, "workers not ready after 60 s"
            time.sleep(0.02)
        (tmp_path / "go").touch()
        outputs = {name: proc.communicate(timeout=60) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"worker {name} failed:\n{outputs[name][1]}"
    ran = {name: json.loads(outputs[name][0].strip().splitlines()[-1]) for name in WORKERS}

    # A third connection, opened after both workers are gone, sees every trial they ran.
    trials = optuna.load_study(study_name="shared", storage=url).get_trials(deepcopy=False)
    numbers = [trial.number for trial in trials]
    # 8 or 9: each worker counts the trials (running ones included) before starting one. If both count 7 at
    # the same moment, before either has created its trial, both start one and the study ends with 9. A worker
    # never has two trials in flight, so it cannot overshoot by more than one.
    assert len(trials) in (TARGET, TARGET + 1), numbers
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert len(set(numbers)) == len(numbers)
    assert sorted(numbers) == list(range(len(trials)))
    assert all(ran[name] for name in WORKERS), f"a worker ran no trial: {ran}"
    by_worker = {
        name: sorted(t.number for t in trials if t.user_attrs.get("worker") == name) for name in WORKERS
    }
    assert by_worker == {name: sorted(ran[name]) for name in WORKERS}
    assert sum(len(v) for v in by_worker.values()) == len(trials)


def test_stop_leaves_nothing_running(tmp_path):
    """stop() must end the server process and delete its folder, and a second stop() must be harmless."""
    from helpers.pg import PostgresUnavailable, process_alive, start_postgres

    try:
        server = start_postgres(tmp_path)
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        pid = server.postmaster_pid()
        assert pid is not None and process_alive(pid)
    finally:
        server.stop()
    assert not process_alive(pid)
    assert not server.root.exists()
    server.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)
