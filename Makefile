# K-FADE — the commands. `.venv` is created on first use: torch first (pinned; override with
# TORCH="torch==2.13.0 --index-url <cuda index>" on a GPU box), then the package with its dev extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
# make test's pytest-xdist processes, one thread each (docs/performance.md: faster than one at two threads)
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo compare test lint bench report clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed  ## the main job on the embedded mini-TOFU benchmark
	PY=$(PY) experiments/sweeps/demo.sh

compare: $(VENV)/.installed  ## every method at matched forget P̄, both regimes: make compare [DIR=...] [ARGS="k=v ..."]
	PY=$(PY) experiments/sweeps/compare.sh $(or $(DIR),multirun/compare/$$(date +%Y-%m-%d_%H-%M-%S)) $(ARGS)

test: $(VENV)/.installed  ## the test suite (CPU, a few minutes): TEST_WORKERS pytest-xdist workers, one thread each
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(TEST_WORKERS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed  ## timing ratios measured side by side (see docs/performance.md)
	$(PY) benchmarks/bench_curvature.py
	$(PY) benchmarks/bench_unlearn.py
	$(PY) benchmarks/bench_unlearn.py --matched --repeats 1

report: $(VENV)/.installed  ## table + Pareto plot of the newest multirun (or DIR=...)
	$(PY) experiments/report.py $(or $(DIR),$$(ls -dt multirun/*/* | head -1))

clean-venv:
	rm -rf $(VENV)
