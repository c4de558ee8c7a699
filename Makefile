# One entry point for a fresh machine: `make verify` (the main job) and `make test`.
# Both create .venv, install the pinned torch/torchvision and fastbone (building the
# CUDA extension with nvcc and the host-emulation extension with g++) when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastbone-installed
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: install verify test bench clean

install: $(STAMP)

$(STAMP): setup.py requirements-dev.txt $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $(STAMP)

verify: install
	$(BIN)/fastbone verify

# --dist loadgroup: tests marked xdist_group(name) share one worker (an expensive session
# fixture, e.g. the sm_90 compile checks, then runs once); the rest is distributed as --dist load.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=30

bench: install
	$(BIN)/python -m pytest bench
	$(BIN)/python bench/bench_models.py

clean:
	rm -rf build $(VENV) *.egg-info fastbone/*.so
