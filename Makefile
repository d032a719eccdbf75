# Everything a newcomer needs: `make demo` and `make test` set up their own environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BT := $(VENV)/bin/boxteacher
DEMO ?= demo
PORT ?= 8000

.PHONY: setup demo test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job end to end (training/demo.py): synthetic shapes -> BoxTeacher trained from boxes
# only -> val AP next to the box-fill baseline, pseudo-mask quality, a table and pictures -> serve.
# ITERS=n trains longer or shorter; UPPER_BOUND=1 adds mask-supervised CondInst (twice the time).
demo: setup
	$(BT) demo --output $(DEMO) --port $(PORT) $(if $(ITERS),--iters $(ITERS)) $(if $(UPPER_BOUND),--upper-bound)
	$(BT) serve --model $(DEMO)/run/model_final.pth --host 127.0.0.1 --port $(PORT)

# The README's test command (and CI's): lint and format check (ruff, pyproject.toml), then the suite.
test: setup lint
	$(PY) -m pytest -q

test-fast: setup lint
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache
