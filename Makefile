# The two commands: `make run` (the server on the sample studies) and `make test` (the test suite).
# Everything else here is what those two need: a project-local virtual environment from pinned
# versions, and the synthetic sample studies.

PYTHON ?= python3.11
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
SAMPLES ?= sample_data
STUDIES ?= $(SAMPLES)/studies
MODELS_DIR ?= models
APP ?= apps/vila_m3
# `no`: start without staging the demo model where no real weights are (e.g. with a remote VLM)
DEMO ?= auto
# A YAML file of changes to configs/demo_model.yaml for the demo build, e.g. tests/data/demo_quick.yaml
DEMO_RECIPE ?=
# Extra MONAI Label --conf pairs, e.g. make run CONF="models vista3d,cxr"
CONF ?=
# Extra pytest arguments (make test lints with ruff first), e.g. make test PYTEST_ARGS="-k samples"
PYTEST_ARGS ?=

BIN := $(VENV)/bin
# Python's UTF-8 mode: text I/O stays UTF-8 even after a library switches the C locale (GDCM does).
export PYTHONUTF8 := 1
CONSTRAINTS := $(abspath requirements/constraints.txt)
STAMP := $(VENV)/.installed

.PHONY: run demo test samples lint venv clean-venv

# With no real weights in MODELS_DIR, the first run builds the demo model (cached; DEMO=no skips it).
run: $(STAMP) samples
	@$(BIN)/vila-m3 serve --host $(HOST) --port $(PORT) --studies $(STUDIES) --models-dir $(MODELS_DIR) --app $(APP) \
		$(if $(filter no,$(DEMO)),,--demo-if-no-weights $(if $(DEMO_RECIPE),--demo-recipe $(DEMO_RECIPE))) $(CONF)

# The server with tiny RANDOM stand-in weights in models-demo/: every task runs, no answer means anything.
demo: $(STAMP) samples
	@test -f models-demo/.staged || { $(BIN)/vila-m3 models stand-ins --models-dir models-demo && touch models-demo/.staged; }
	@$(BIN)/vila-m3 serve --host $(HOST) --port $(PORT) --studies $(STUDIES) --models-dir models-demo --app $(APP) $(CONF)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

samples: $(STAMP)
	@$(BIN)/vila-m3 samples --out $(SAMPLES)

lint: $(STAMP)
	$(BIN)/ruff check .

venv: $(STAMP)

# PIP_CONSTRAINT reaches the isolated build environments too (sam2 builds from source and would
# otherwise pull the newest torch into its build environment).
$(STAMP): setup.cfg requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CONSTRAINTS) $(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

clean-venv:
	rm -rf $(VENV)
