# vitpipe: two commands on a fresh machine. `make run` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fmnist_cpu.yaml
ARGS ?=
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Pinned: these two come from local disk here; unpinned, torch pulls several GB.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test install install-test system-deps lint bench clean help

help:
	@echo "make run   # install if needed, then train+register on real Fashion-MNIST (CONFIG=$(CONFIG))"
	@echo "make test  # install if needed, then run the whole test suite"

system-deps: $(FMNIST_DIR)/train-images-idx3-ubyte.gz

$(FMNIST_DIR)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e . $(TORCH_PINS)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $@

install: system-deps $(VENV)/.installed
install-test: system-deps $(VENV)/.installed-test

run: install
	$(PY) -m flows.pipeline --config $(CONFIG) $(ARGS)

test: install-test
	$(VENV)/bin/ruff check vitpipe flows tests bench
	$(PY) -m pytest $(ARGS)

bench: install-test
	$(PY) bench/model_speed.py
	$(PY) bench/data_speed.py
	$(PY) bench/train_speed.py
	$(PY) bench/serve_speed.py
	$(PY) bench/score_speed.py

clean:
	rm -rf runs shards mlruns mlartifacts mlflow.db .pytest_cache
