# pageflip: `make demo` and `make test` set up .venv from scratch, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench guest qemu wrk clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q src
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pageflip demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# The tests start hundreds of Python processes: compiled modules save each of them the
# compiling (an environment with PYTHONDONTWRITEBYTECODE set would otherwise redo it each time).
unit: $(STAMP)
	$(BIN)/python -m compileall -q src tests
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pageflip bench handoff --size 1G

guest: $(STAMP)
	$(BIN)/python -c 'from pageflip.vm import guest_elf; print(guest_elf())'

# QEMU for `pageflip bench vm` (Debian's qemu-system-x86), only when it is missing. Tests never
# need it.
qemu:
	@if command -v qemu-system-x86_64 >/dev/null 2>&1; then \
		qemu-system-x86_64 --version | head -n 1; \
	else \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86; \
	fi

# wrk for `pageflip bench live --load wrk` (Debian's wrk), only when it is missing. Tests never
# need it.
wrk:
	@if command -v wrk >/dev/null 2>&1; then \
		wrk --version 2>&1 | head -n 1; \
	else \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk; \
	fi

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
