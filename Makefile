# dsd-caffe: the two commands of the README, and the set-up they share.
PYTHON ?= python3
# DSD_CAFFE_BUILD=gpu: every target below uses the CUDA build of Caffe in .venv-gpu (docs/gpu.md); default cpu.
DSD_CAFFE_BUILD ?= cpu
ifeq ($(DSD_CAFFE_BUILD),gpu)
VENV ?= .venv-gpu
BUILD_FLAGS := --gpu
else ifeq ($(DSD_CAFFE_BUILD),cpu)
VENV ?= .venv
BUILD_FLAGS :=
else
$(error DSD_CAFFE_BUILD must be cpu or gpu, not '$(DSD_CAFFE_BUILD)')
endif
PY := $(VENV)/bin/python

.PHONY: setup setup-gpu demo test bench caffe-gtest clean-venv

# Build (or reuse the cached) Caffe, create .venv, install the project. A second run takes seconds.
setup:
	$(PYTHON) -m dsd_caffe.build $(BUILD_FLAGS) --venv $(VENV)

# The CUDA build (long: about an hour on 2 cores) in .venv-gpu, beside the CPU one; same as DSD_CAFFE_BUILD=gpu make setup.
setup-gpu:
	$(MAKE) setup DSD_CAFFE_BUILD=gpu

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
