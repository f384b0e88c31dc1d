# distortkd — every target sets itself up: `make test` on a fresh clone installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install fashion-mnist test test-fast lint demo bench table1 table2 table3 fig2 fig3 fig4 clean

install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Debian's packaged Fashion-MNIST: the real data for the offline demo and real-data tests.
fashion-mnist:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || test -f $(FMNIST)/train-images-idx3-ubyte || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

test: install fashion-mnist
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check distortkd tests experiments

# The main job, offline: the whole method on real Fashion-MNIST in <= 15 min on 2 CPU cores.
SEEDS ?= 1
FAST ?= 0
demo: install fashion-mnist
	SEEDS=$(SEEDS) FAST=$(FAST) bash experiments/demo/run.sh
