# defectae: `make test` and `make demo` work on a fresh clone (both install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision.ops; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	DEFECTAE_HOME=demo $(BIN)/python -m defectae prepare --profile synthetic-ae --synthetic woven

bench: install
	$(BIN)/python -m defectae bench --out bench/bench.json

lint: install
	$(BIN)/ruff check defectae tests
	$(BIN)/ruff format --check defectae tests

clean:
	rm -rf $(VENV) demo bench .pytest_cache
