# Everything a newcomer needs: `make demo` and `make test` set up their own environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BT := $(VENV)/bin/boxteacher
DEMO ?= demo
PORT ?= 8000

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job end to end: synthetic data -> train the tiny model -> evaluate -> overlays.
demo: setup
	$(BT) make-synthetic $(DEMO)/data --train 200 --val 50 --size 128 --seed 0
	$(BT) train --config configs/synthetic-tiny.yaml --data $(DEMO)/data --output $(DEMO)/run --no-eval solver.max_iter=$(or $(ITERS),600)
	$(BT) eval --weights $(DEMO)/run/model_final.pth --data $(DEMO)/data --output $(DEMO)/eval
	$(BT) eval --weights $(DEMO)/run/model_final.pth --data $(DEMO)/data --output $(DEMO)/eval-boxfill --mask-mode box
	$(BT) visualize --weights $(DEMO)/run/model_final.pth --images $$(ls $(DEMO)/data/images/*.png | head -8) --output $(DEMO)/overlays
	@echo "metrics: $(DEMO)/eval/metrics.json (box-fill baseline: $(DEMO)/eval-boxfill/metrics.json); overlays: $(DEMO)/overlays/"
	@echo ""
	@echo "Serving the model on http://127.0.0.1:$(PORT) (Ctrl-C to stop). Try, from another shell:"
	@echo "  curl -s -F image=@$$(ls $(DEMO)/data/images/*.png | head -1) 'http://127.0.0.1:$(PORT)/v1/segment?mask_format=none'"
	@echo "  curl -s -F image=@$$(ls $(DEMO)/data/images/*.png | head -1) -F 'boxes=[[10,10,80,80]]' http://127.0.0.1:$(PORT)/v1/segment"
	@echo "or open http://127.0.0.1:$(PORT)/ in a browser."
	$(BT) serve --model $(DEMO)/run/model_final.pth --host 127.0.0.1 --port $(PORT)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO) .pytest_cache
