# lamina: `make demo` and `make test` are the two entry points (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0

.PHONY: install fixtures lint format test demo clean

install: $(STAMP)

# torch is pinned and installed first: this machine serves the CPU build of 2.13.0 from
# local disk, while a bare `torch` requirement would pull a multi-GB CUDA build.
# vptq (its loader reads the vptq export in the tests) goes in without its requirements:
# gradio, plotly, datasets and pynvml serve its demo app; what `import vptq` needs
# (sentence-transformers, accelerate, transformers) is in the test extras. autoawq (deprecated,
# sdist only) likewise: the tests read AWQ exports back with its unpacking code alone.
# infra/docker/constraints.txt pins what the image installs, and the same versions here.
$(STAMP): pyproject.toml Makefile infra/docker/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --constraint infra/docker/constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps vptq==0.0.5.post1
	$(BIN)/python -m pip install -q --no-deps autoawq==0.2.9
	touch $(STAMP)

fixtures: install
	$(BIN)/python scripts/fetch_fixtures.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest exits 5 when it collects no test: say so and fail, rather than pass silently.
test: fixtures lint
	$(RAY_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider --durations=12 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: fixtures
	mkdir -p /tmp/lamina-demo-ray
	RAY_TMPDIR=$${RAY_TMPDIR:-/tmp/lamina-demo-ray} $(RAY_ENV) $(BIN)/python scripts/demo.py --fresh

clean:
	rm -rf $(VENV) .cache
