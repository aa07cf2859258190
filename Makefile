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

# The whole pipeline on the generated woven texture: an `ae` on 64x64 patches, trained for a few minutes on a CPU.
# Test-time settings chosen on validation images with pasted synthetic defects (never on test labels):
# the squared-error residual smoothed with sigma = patch / 8, and an image score that ignores an 8 px border frame.
DEMO := DEFECTAE_HOME=demo $(BIN)/python -m defectae
DEMO_PROFILE := --profile synthetic-ae --set model.input_size=64 --set tile.stride=16 \
	--set 'tile.residual={ssim=0, l2=1}' --set tile.smooth_sigma=8 --set tile.score_margin=8
DEMO_TRAIN := --set augment.n_patches=6000 --set augment.n_val_patches=256 \
	--set train.epochs=15 --set train.batch_size=64 --set train.lr=1e-3 --set train.patience=0

demo: install
	$(DEMO) prepare --synthetic woven
	$(DEMO) augment $(DEMO_PROFILE) $(DEMO_TRAIN)
	$(DEMO) train $(DEMO_PROFILE) $(DEMO_TRAIN)
	$(DEMO) tile-test $(DEMO_PROFILE)
	$(DEMO) score $(DEMO_PROFILE)

bench: install
	$(BIN)/python -m defectae bench --out bench/bench.json

lint: install
	$(BIN)/ruff check defectae tests
	$(BIN)/ruff format --check defectae tests

clean:
	rm -rf $(VENV) demo bench .pytest_cache
