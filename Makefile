# Two entry points (see README): `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

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
	# pytest exits 5 when it collects nothing: an empty suite is a failure here.
	# The validation matrix times real runs against predictions, so it runs first, in a
	# pytest process of its own: after the rest of the suite, in the same process, the
	# real runs came out 10-20 % slower than alone (README, Validate).
	for args in tests/test_validation_matrix.py "--ignore=tests/test_validation_matrix.py"; do \
	  $(BIN)/python -m pytest -q $$args; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "no tests were collected ($$args)" >&2; exit 1; fi; \
	  if [ $$status -ne 0 ]; then exit $$status; fi; \
	done

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) demo-out
