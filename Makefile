# Everything the project needs is installed from here: `make` creates .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all venv test lint types contracts unit up bench clean

all: venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check libs tests bench

types: venv
	$(BIN)/mypy --strict libs/jobtree/core

contracts: venv
	$(BIN)/lint-imports

unit: venv
	$(BIN)/pytest

test: lint types contracts unit

up: venv
	$(BIN)/jobtree up

bench: venv
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
