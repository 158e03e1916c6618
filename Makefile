# ctpm: `make demo` runs the study on synthetic data, `make test` runs the suite, `make lint` runs
# ruff (its rules are in pyproject.toml).
# Both create .venv on first use. TORCH picks the PyTorch build: the default is the CPU wheel that
# these machines keep on disk; on a CUDA machine use `make install TORCH=torch` (or a pinned
# `torch==X.Y.Z`), which takes the ordinary CUDA build from PyPI.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ctpm-installed
DEMO   ?= outputs/demo
JOBS   ?= 2

.PHONY: install test demo bench clean lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/python -m ruff check .

demo: $(STAMP)
	$(BIN)/python -m ctpm.cli.study train_scale=demo out=$(DEMO)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --readme README.md

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
