# defectae: `make test` and `make demo` work on a fresh clone (both install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench results lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision.ops; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

# One pytest worker per CPU core; a test file stays on one worker (its module fixtures are built once).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# The whole pipeline on the generated woven texture: the recipe profiles/synthetic-ae.toml (an `ae` on
# 64x64 patches, a few minutes of training on a CPU; its test-time settings were chosen on validation
# images with pasted synthetic defects, never on test labels).
DEMO := DEFECTAE_HOME=demo $(BIN)/python -m defectae
DEMO_PROFILE := --profile synthetic-ae

demo: install
	$(DEMO) prepare $(DEMO_PROFILE)
	$(DEMO) augment $(DEMO_PROFILE)
	$(DEMO) train $(DEMO_PROFILE)
	$(DEMO) tile-test $(DEMO_PROFILE)
	$(DEMO) score $(DEMO_PROFILE)

# Every shipped recipe, end to end on the data it is given, then one table (results/RESULTS.md and .json).
# Magnetic Tile is read from MT_ROOT (not in this repository), trained on the DifferNet split.
MT_ROOT ?= ../shared/data/magnetic_tile
RECIPES ?= synthetic-ae synthetic-dae synthetic-cnnae synthetic-rd synthetic-dfr synthetic-draem \
  synthetic-grid-rd synthetic-grid-dfr synthetic-grid-draem \
  magnetic-tile-ae magnetic-tile-dae magnetic-tile-cnnae magnetic-tile-rd magnetic-tile-dfr \
  magnetic-tile-draem
RESULTS ?= results

results: install
	@set -e; for r in $(RECIPES); do \
	  d=$(RESULTS)/$$r; rm -rf $$d; mkdir -p $$d; run="env DEFECTAE_HOME=$$d $(BIN)/defectae"; \
	  case $$r in \
	    magnetic-tile-*) data="--root $(MT_ROOT) --set dataset.train_list=$(MT_ROOT)/differnet_train_split.txt";; \
	    *) data="";; \
	  esac; \
	  echo "== $$r"; \
	  $$run prepare -p $$r $$data -q; \
	  $$run augment -p $$r -q; \
	  start=$$(date +%s); $$run train -p $$r --json > $$d/train.json; \
	  echo $$(( $$(date +%s) - start )) > $$d/train.seconds; \
	  $$run tile-test -p $$r -q; \
	  $$run score -p $$r --json > $$d/score.json; \
	done; \
	$(BIN)/python -m defectae.results $(addprefix $(RESULTS)/,$(RECIPES)) --out $(RESULTS)/RESULTS.md

bench: install
	$(BIN)/python -m defectae bench --out bench/bench.json

lint: install
	$(BIN)/ruff check defectae tests
	$(BIN)/ruff format --check defectae tests

clean:
	rm -rf $(VENV) demo bench results .pytest_cache
