"""Serving follows a task's versions (multitune.health.versions): a folder serves its current version, a
reload without a path re-resolves it, the version watch (serve/follow.py) reloads a task whose pointer moved
and nothing else, a task loaded from ROOT/versions/N stays pinned, a failed switch keeps the served version,
the task card says which folder version is served, and a real server on loopback picks up a promote and a
rollback (by the watch, or by /admin/reload without a path) while the other tasks' answers stay bit-identical."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from helpers import perturb, toy_sentiment

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.health import versions
from multitune.health.profile import build_profile, save_profile
from multitune.methods.lora import LoRAConfig
from multitune.models import load_base
from multitune.serve import cli as server_module
from multitune.serve.app import create_app
from multitune.serve.engine import Engine
from multitune.serve.follow import VersionWatch, folder_version
from multitune.serve.scheduler import Scheduler
from multitune.storage import load_adapter, save_adapter

TEXTS = ["good movie", "awful food and bad service", "the film was not great", "what a happy place", "sad"]
TASKS = ("run", "mood", "other")  # a train run folder and two bank task folders; "other" is never updated
Outputs = dict[str, list[dict[str, float]]]


# ---- folders -----------------------------------------------------------------------------------------------
def engine_outputs(engine: Engine) -> Outputs:
    """Each task's probabilities of TEXTS, one task per call (one forward of that task's rows alone)."""
    return {task: engine.classify([(task, text) for text in TEXTS]) for task in engine.tasks}


@pytest.fixture(scope="module")
def made(tmp_path_factory, bert_dir) -> tuple[Path, Outputs, Outputs]:
    """Folders with version 2 written by hand beside each original (no pointer yet), the originals' outputs,
    and version 2's (version 2 of ``run`` holds a drift profile, version 1 none)."""
    root = tmp_path_factory.mktemp("versioned")
    bank = MultiTaskModel(load_base(str(bert_dir), device="cpu"))
    for seed, task in enumerate(TASKS):
        bank.add_task(task, "classification", "lora", LoRAConfig(rank=4), ["neg", "pos"])
        perturb(bank, task, seed=seed)
    save_adapter(bank, "run", root / "run" / "adapter")
    (root / "run" / "config.yaml").write_text("train:\n  max_length: 32\n")
    save_adapter(bank, "mood", root / "bank" / "mood")
    save_adapter(bank, "other", root / "bank" / "other")
    original = engine_outputs(Engine.from_folder([root / "run", root / "bank"], device="cpu"))

    updated = MultiTaskModel(load_base(str(bert_dir), device="cpu"))
    for task, folder in (("run", root / "run"), ("mood", root / "bank" / "mood")):
        load_adapter(updated, versions.original_adapter(folder), task)
        perturb(updated, task, seed=100 + len(task))
        save_adapter(updated, task, versions.version_folder(folder, 2))
    save_profile(
        build_profile(updated, "run", toy_sentiment(64), 32), versions.version_folder(root / "run", 2)
    )
    pinned = [versions.version_folder(root / "run", 2), versions.version_folder(root / "bank" / "mood", 2)]
    second = engine_outputs(Engine.from_folder(pinned, device="cpu"))
    assert second["run"] != original["run"] and second["mood"] != original["mood"]
    return root, original, second


@pytest.fixture
def folders(made, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the run folder and the bank (each test moves its own pointers)."""
    root = made[0]
    shutil.copytree(root / "run", tmp_path / "run")
    shutil.copytree(root / "bank", tmp_path / "bank")
    return tmp_path / "run", tmp_path / "bank"


@contextmanager
def scheduled(paths) -> Iterator[Scheduler]:
    scheduler = Scheduler(Engine.from_folder(paths, device="cpu"), max_wait_ms=1)
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()


def served(scheduler: Scheduler, task: str) -> list[dict[str, float]]:
    rows = asyncio.run(scheduler.classify(task, TEXTS))
    return [row.probabilities for row in rows]


# ---- in process --------------------------------------------------------------------------------------------
def test_a_folder_serves_its_current_version_and_a_reload_without_path_follows_the_pointer(made, folders):
    _, original, second = made
    run, bank = folders
    versions.set_current(run, 2)
    versions.set_current(bank / "mood", 2)
    with scheduled([run, bank]) as scheduler:
        engine = scheduler.engine
        assert engine.sources["run"] == str(run) and engine.adapters["run"] == run / "versions" / "2"
        assert engine.sources["mood"] == str(bank / "mood") and engine.adapters["other"] == bank / "other"
        assert engine.max_lengths["run"] == 32  # version 2 keeps the run's settings (RUN/config.yaml)
        assert served(scheduler, "run") == second["run"] and served(scheduler, "mood") == second["mood"]
        cards = scheduler.tasks()
        assert [cards[t]["task_version"] for t in TASKS] == [2, 2, 1] and cards["run"]["version"] == 1
        assert scheduler.monitor is not None and scheduler.monitor.state()["tasks"]["run"]["monitored"]

        versions.set_current(run, 1)  # a rollback
        card = asyncio.run(scheduler.reload("run"))
        assert card["task_version"] == 1 and card["version"] == 2
        assert served(scheduler, "run") == original["run"]  # the very bytes version 1 served before
        assert served(scheduler, "mood") == second["mood"] and served(scheduler, "other") == original["other"]
        assert not scheduler.monitor.state()["tasks"]["run"]["monitored"]  # version 1's folder has no profile
        assert engine.sources[scheduler.names.internal["run"]] == str(run)  # still followed


def test_the_watch_reloads_the_tasks_whose_pointer_moved_and_keeps_a_failed_one(made, folders, caplog):
    _, original, second = made
    run, bank = folders
    with scheduled([run, bank]) as scheduler:
        watch = VersionWatch(scheduler, interval=1)
        assert watch.due() == {}  # no pointer anywhere: every folder serves version 1
        versions.set_current(bank / "mood", 2)
        assert watch.due() == {"mood": 2}
        assert asyncio.run(watch.poll()) == {"mood": 2} and watch.due() == {}
        assert served(scheduler, "mood") == second["mood"]
        assert served(scheduler, "run") == original["run"] and served(scheduler, "other") == original["other"]
        assert scheduler.tasks()["run"]["version"] == 1  # untouched tasks were not reloaded

        versions.pointer_file(bank / "mood").write_text("3\n")  # a version that does not exist
        with caplog.at_level(logging.WARNING, logger="multitune.serve"):
            assert asyncio.run(watch.poll()) == {} and asyncio.run(watch.poll()) == {}
        failures = [r for r in caplog.records if "could not switch to version 3" in r.getMessage()]
        assert len(failures) == 1 and "has no version 3" in failures[0].getMessage()  # tried once
        assert scheduler.tasks()["mood"]["task_version"] == 2 and served(scheduler, "mood") == second["mood"]

        versions.set_current(bank / "mood", 1)
        assert asyncio.run(watch.poll()) == {"mood": 1} and served(scheduler, "mood") == original["mood"]


def test_a_task_loaded_from_a_version_folder_stays_pinned(made, folders):
    _, original, second = made
    run, _ = folders
    versions.set_current(run, 2)
    with scheduled(run / "versions" / "2") as scheduler:
        assert scheduler.engine.sources["run"] == str(run / "versions" / "2")
        versions.set_current(run, 1)
        assert VersionWatch(scheduler).due() == {}
        card = asyncio.run(scheduler.reload("run"))
        assert card["task_version"] == 2 and served(scheduler, "run") == second["run"]
        # an explicit path moves it, and a task root given so is followed from then on
        card = asyncio.run(scheduler.reload("run", str(run)))
        assert card["task_version"] == 1 and served(scheduler, "run") == original["run"]
        versions.set_current(run, 2)
        assert VersionWatch(scheduler).due() == {"run": 2}


def test_folder_version_reads_the_layout(tmp_path):
    assert folder_version(tmp_path / "run" / "versions" / "7") == 7
    assert folder_version(tmp_path / "run" / "adapter") == 1 and folder_version(tmp_path / "bank" / "t") == 1


# ---- a real server on loopback -----------------------------------------------------------------------------
@contextmanager
def running(app) -> Iterator[httpx.Client]:
    """``app`` on a real uvicorn in a background thread, on a free loopback port; yields a client of it."""
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
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def classify(http: httpx.Client, task: str) -> list[dict[str, float]]:
    reply = http.post("/v1/classify", json={"model": task, "input": TEXTS})
    assert reply.status_code == 200, reply.text
    return [row["probabilities"] for row in reply.json()["data"]]


def task_version(http: httpx.Client, task: str) -> int:
    return http.get(f"/v1/models/{task}").json()["task_version"]


def test_a_real_server_follows_a_promote_and_a_rollback(made, folders):
    _, original, second = made
    run, bank = folders
    versions.set_current(run, 2)
    scheduler = Scheduler(Engine.from_folder([run, bank], device="cpu"), max_wait_ms=1)
    with running(create_app(scheduler, load_from=[run, bank], watch_versions=0.2)) as http:
        listed = {card["id"]: card["task_version"] for card in http.get("/v1/models").json()["data"]}
        assert listed == {"run": 2, "mood": 1, "other": 1}
        assert classify(http, "run") == second["run"]
        others = {task: classify(http, task) for task in ("mood", "other")}
        assert others == {task: original[task] for task in ("mood", "other")}

        versions.set_current(run, 1)  # a rollback: picked up within a few polls, no request needed
        assert wait_for(lambda: task_version(http, "run") == 1, seconds=20)
        assert classify(http, "run") == original["run"]
        versions.set_current(bank / "mood", 2)  # a promote of another task
        assert wait_for(lambda: task_version(http, "mood") == 2, seconds=20)
        assert classify(http, "mood") == second["mood"]
        assert classify(http, "other") == original["other"] and classify(http, "run") == original["run"]
        assert http.get("/v1/models/other").json()["version"] == 1  # never reloaded


def test_admin_reload_without_path_serves_the_current_version(made, folders):
    _, original, second = made
    run, bank = folders
    scheduler = Scheduler(Engine.from_folder([run, bank], device="cpu"), max_wait_ms=1)
    with running(create_app(scheduler, load_from=[run, bank])) as http:  # no watch: nothing moves alone
        assert classify(http, "run") == original["run"]
        versions.set_current(run, 2)
        time.sleep(0.5)
        assert task_version(http, "run") == 1 and classify(http, "run") == original["run"]
        reply = http.post("/admin/reload", json={"model": "run"})
        assert reply.status_code == 200 and reply.json()["task_version"] == 2 and reply.json()["version"] == 2
        assert classify(http, "run") == second["run"] and task_version(http, "run") == 2
        assert classify(http, "other") == original["other"] and classify(http, "mood") == original["mood"]


# ---- the command -------------------------------------------------------------------------------------------
def test_serve_watch_versions_flag(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    server_module.add_serve_arguments(parser)
    seen: dict = {}
    monkeypatch.setattr(server_module, "serve", lambda paths, **kwargs: seen.update(kwargs))
    server_module.cmd_serve(parser.parse_args([str(tmp_path)]))
    assert seen["watch_versions"] == 2.0
    server_module.cmd_serve(parser.parse_args([str(tmp_path), "--watch-versions", "0"]))
    assert seen["watch_versions"] == 0.0
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--watch-versions must be >= 0"):
        server_module.serve(tmp_path, watch_versions=-1)
