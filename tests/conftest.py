"""pytest fixtures shared by every test folder; the helpers they use live in tests/helpers (on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, save_tiny

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each (and
    os.environ["OMP_NUM_THREADS"] = "1"  # each process a test starts), so that they never contend for a core
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """URL of a real PostgreSQL server on loopback for the whole session (tests/pg.py); skips without one."""
    from helpers.pg import PostgresUnavailable, start_postgres

    try:
        server = start_postgres(tmp_path_factory.mktemp("postgres"))
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def one_thread():
    """One torch thread: on 2 shared cores, 2 threads stall on every tiny op (1 s runs took 30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
