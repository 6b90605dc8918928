# tunelab: `make demo` and `make test` each set up .venv from nothing.
# torch is installed first, pinned to 2.13.0: on a machine without a GPU pip takes the local CPU
# build; nothing later may pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo demo-lora test test-slow lint format bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
# The C++ CPU kernels, both at once (tunelab/kernels/__main__.py); without a compiler tunelab runs
# without them, so a failed build does not stop the set-up.
	$(PY) -m tunelab.kernels || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunelab demo --config configs/demo.yaml

demo-lora: $(STAMP)
	$(VENV)/bin/tunelab demo --config configs/demo-lora.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=15

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .cache runs
