# dsd-caffe: the two commands of the README, and the set-up they share.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench caffe-gtest clean-venv

# Build (or reuse the cached) Caffe, create .venv, install the project. A second run takes seconds.
setup:
	$(PYTHON) -m dsd_caffe.build

# The main job: Dense-Sparse-Dense on Fashion-MNIST against its equal-length dense control.
demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

# Caffe's own gtest cases for every layer our performance patches change, against the set-up's build (a few minutes).
caffe-gtest: setup
	$(PYTHON) -m dsd_caffe.build --gtest

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
