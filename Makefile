# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create/refresh a local .venv and install the project into it first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch/torchvision pinned to the releases this team's machines carry; override for other platforms,
# e.g.  make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO   ?= data/demo
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint clean real-study

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,distributed]'
	$(PY) -c "import torch, torchvision, openslide, h5py, albumentations, sklearn; print('venv ready: torch', torch.__version__, '| openslide', openslide.__library_version__)"
	touch $(STAMP)

venv: $(STAMP)

# The whole study, end to end, on synthetic demo data (numbers are NOT science; see README).
demo: venv
	$(PY) scripts/make_demo_data.py --out $(DEMO) --seed 0
	$(PY) scripts/pretrain_prcc.py --config configs/demo_prcc.yaml --data $(DEMO)/prcc
	$(PY) scripts/extract_patches.py --slides $(DEMO)/cam16/slides --annotations $(DEMO)/cam16/annotations \
		--out $(DEMO)/cam16/patches.h5 --patch-size 64 --mpp 1.0
	$(PY) scripts/pretrain_cam16.py --config configs/demo_cam16.yaml --data $(DEMO)/cam16/patches.h5
	$(PY) scripts/sweep.py --config configs/demo_sweep.yaml --data $(DEMO)/wbc
	$(PY) scripts/report.py runs/demo_sweep

# The real study on ../shared/data (skips with a message when absent); resumable. See RESULTS.md.
real-study: venv
	$(PY) benchmarks/real_study/run.py

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs data/demo
