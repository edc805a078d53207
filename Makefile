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
# `real`: first pull the real weights (VILA-M3, VISTA3D, BRATS, TorchXRayVision; skips what verifies; needs
# huggingface.co and the MONAI model zoo), then serve them, no demo. VLM: vila_m3_3b, vila_m3_8b or vila_m3_13b.
MODELS ?= demo
VLM ?= vila_m3_3b
# Extra MONAI Label --conf pairs, e.g. make run CONF="models vista3d,cxr"
CONF ?=
# Extra pytest arguments (make test lints with ruff first), e.g. make test PYTEST_ARGS="-k samples"
PYTEST_ARGS ?=
# The web viewer (web/viewer.py) that `make run` starts beside the server; WEB=no skips it. WEB_HOST=0.0.0.0
# serves the page to other machines.
WEB ?= yes
WEB_HOST ?= 127.0.0.1
WEB_PORT ?= 8080

BIN := $(VENV)/bin
# Python's UTF-8 mode: text I/O stays UTF-8 even after a library switches the C locale (GDCM does).
export PYTHONUTF8 := 1
CONSTRAINTS := $(abspath requirements/constraints.txt)
STAMP := $(VENV)/.installed

# The test PACS (make pacs): Orthanc with its DICOMweb plugin, from Debian's packages
PACS_PACKAGES := orthanc orthanc-dicomweb
PACS_PORT ?= 8042
PACS_DIR ?= .pacs

.PHONY: run demo demo-rebuild test samples lint venv clean-venv pacs pacs-deps

# With no real weights in MODELS_DIR, the first run stages the demo shipped in demo/ (DEMO=no skips it).
run: $(STAMP) samples $(if $(filter no,$(WEB)),,web-deps)
	$(if $(filter real,$(MODELS)),@$(BIN)/vila-m3 models pull --real --vlm $(VLM) --models-dir $(MODELS_DIR))
	@$(if $(filter no,$(WEB)),,$(WEB_START)) $(BIN)/vila-m3 serve --host $(HOST) --port $(PORT) --studies $(STUDIES) --models-dir $(MODELS_DIR) --app $(APP) \
		$(if $(filter real,$(MODELS)),--conf vlm $(VLM),$(if $(filter no,$(DEMO)),,--demo-if-no-weights \
		$(if $(DEMO_RECIPE),--demo-recipe $(DEMO_RECIPE)))) $(CONF)

# The server with tiny RANDOM stand-in weights in models-demo/: every task runs, no answer means anything.
demo: $(STAMP) samples
	@test -f models-demo/.staged || { $(BIN)/vila-m3 models stand-ins --models-dir models-demo && touch models-demo/.staged; }
	@$(BIN)/vila-m3 serve --host $(HOST) --port $(PORT) --studies $(STUDIES) --models-dir models-demo --app $(APP) $(CONF)

# For maintainers: build the shipped demo (demo/) again from its recipes (about 40 min on two CPU cores) and
# compare it with what is shipped (equal bits, or the held-out table and the Dice side by side); SHIP=yes
# then makes the rebuild the shipped build (commit demo/ with it).
# CPU_PROFILE=avx2 pins torch, MKL and oneDNN to AVX2 kernels: the same bits on every AVX2 machine
# (configs/demo_cpu_profiles.yaml). PARTS=vlm (or vista3d,brats) builds only those and keeps the others from
# demo/ (they must be of their current recipes): about 15 min for the VLM alone.
demo-rebuild: $(STAMP)
	$(BIN)/vila-m3 models demo-rebuild --cpu-profile $(or $(CPU_PROFILE),native) $(if $(PARTS),--parts $(PARTS)) $(if $(filter yes,$(SHIP)),--ship)

# The PACS tests need Orthanc: pacs-deps installs it where it can, else names the packages (tests then skip, saying so).
test: $(STAMP) pacs-deps web-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

samples: $(STAMP)
	@$(BIN)/vila-m3 samples --out $(SAMPLES)

# Orthanc and its DICOMweb plugin: installed with apt-get where missing and we are root; otherwise says what
# to install (the PACS tests are then reported as skipped, naming the packages).
pacs-deps:
	@if command -v Orthanc >/dev/null 2>&1 || test -x /usr/sbin/Orthanc; then \
		if ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so* >/dev/null 2>&1; then exit 0; fi; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(PACS_PACKAGES) (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PACS_PACKAGES) >/dev/null; \
	else \
		echo "note: Orthanc is missing: install Debian's packages $(PACS_PACKAGES) (sudo apt-get install -y $(PACS_PACKAGES)); the PACS tests are skipped without them"; \
	fi

# The web viewer's system packages (Debian): Mesa's EGL for offscreen rendering, Chromium for the browser
# tests. Installed with apt-get where missing and we are root; otherwise says what to install (the browser
# tests are then reported as skipped, naming the package).
WEB_PACKAGES := chromium libegl1 libegl-mesa0 libgl1-mesa-dri
.PHONY: web-deps
web-deps:
	@missing=""; for pkg in $(WEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "note: the web viewer needs Debian's packages$$missing (sudo apt-get install -y$$missing); the browser tests are skipped without chromium"; \
	fi

# The viewer in the background, stopped when the server stops; its page asks the server over HTTP.
WEB_START = echo "Web viewer: http://$(if $(filter 0.0.0.0,$(WEB_HOST)),<this machine>,$(WEB_HOST)):$(WEB_PORT)/ (WEB=no skips it)"; \
	$(BIN)/python web/viewer.py --server http://$(if $(filter 0.0.0.0,$(HOST)),127.0.0.1,$(HOST)):$(PORT) \
		--host $(WEB_HOST) --port $(WEB_PORT) & viewer=$$!; trap 'kill $$viewer 2>/dev/null' EXIT INT TERM;

# An Orthanc on 127.0.0.1:$(PACS_PORT) holding the sample studies (storage in $(PACS_DIR)/); Ctrl-C stops it.
# Then, in another terminal: make run STUDIES=http://127.0.0.1:$(PACS_PORT)/dicom-web
pacs: $(STAMP) samples pacs-deps
	@$(BIN)/python tests/pacs_harness.py --samples $(SAMPLES) --workdir $(PACS_DIR) --port $(PACS_PORT)

lint: $(STAMP)
	$(BIN)/ruff check .

venv: $(STAMP)

# PIP_CONSTRAINT reaches the isolated build environments too (sam2 builds from source and would
# otherwise pull the newest torch into its build environment).
$(STAMP): setup.cfg requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); if [ -t 1 ]; then quiet=; note=; else quiet=--quiet; note="; pip's own progress shows on a terminal only"; fi; \
		echo "Installing VILA-M3's Python packages into $(VENV) (pinned versions): about 9 min and 9.2 GB the first time, mostly PyTorch$$note"; \
		PIP_CONSTRAINT=$(CONSTRAINTS) $(BIN)/python -m pip install $$quiet -e '.[test,web]' \
		&& took=$$(( $$(date +%s) - start )) && echo "Installed in $$((took / 60)) min $$((took % 60)) s"
	@touch $@

clean-venv:
	rm -rf $(VENV)
