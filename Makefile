# The two commands of the README: `make run` (local demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test gen check-gen migrate demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

## make run: install, migrate, load the demo registry, serve on 127.0.0.1:50051 (SQLite under var/)
run: $(STAMP)
	$(BIN)/entitlement demo init
	$(BIN)/python server.py

## make test: install and run the whole suite (PostgreSQL tests need 127.0.0.1:5432, see README)
test: $(STAMP)
	$(BIN)/python -m pytest

## make gen: regenerate entitlement/v1 from proto/
gen: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

check-gen: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

migrate: $(STAMP)
	$(BIN)/entitlement db upgrade

## make bench: benchmarks, figures printed and kept in BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var
