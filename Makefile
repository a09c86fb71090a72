# Everything the project needs is installed from here: `make` creates .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv browser proto proto-check crds crds-check test lint types contracts unit up bench clean

all: venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check libs services tests bench

types: venv
	$(BIN)/mypy --strict libs/jobtree/core

contracts: venv
	$(BIN)/lint-imports

proto: venv
	$(BIN)/python tools/gen_proto.py

proto-check: venv
	$(BIN)/python tools/check_proto_fresh.py

crds: venv
	$(BIN)/python tools/gen_crds.py

crds-check: venv
	$(BIN)/python tools/gen_crds.py --check

# Debian's chromium for the dashboard's browser tests (a system package: installed here, not by hand).
browser:
	bash tools/install_browser.sh

unit: venv browser
	$(BIN)/pytest -q

test: lint types contracts proto-check crds-check unit

up: venv
	$(BIN)/jobtree up

bench: venv
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
