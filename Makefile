# Two entry points (see README): `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/clustersim demo --out demo-out

test: $(VENV)/.installed
	$(BIN)/ruff check .
	# pytest exits 5 when it collects nothing: an empty suite is a failure here
	$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status

# Without the tests that start processes or namespaces, and with a smaller hypothesis
# budget: under a minute, for the edit-test loop. CI runs `make test`.
test-fast: $(VENV)/.installed
	$(BIN)/ruff check .
	CLUSTERSIM_FAST=1 $(BIN)/python -m pytest -q -m "not spawns"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/search.py

# On a machine with a CUDA GPU: the NCCL path and the simulator's single-GPU error
# (benchmarks/gpu_results.md). Uses the torch installed there, not the pinned CPU build.
bench-gpu:
	PYTHONPATH=. python3 benchmarks/gpu.py --out gpu-out

clean:
	rm -rf $(VENV) demo-out gpu-out
