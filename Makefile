# roar: two commands on a fresh clone — `make demo` and `make test`. Both create .venv when needed.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   := torch==2.14.1 torchvision==0.29.1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-fast test-gpu bench clean

venv: $(STAMP)

# torch first and pinned, so no resolver ever picks torch; then the project with its dev extras.
$(STAMP): pyproject.toml setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e '.[dev]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m experiments.demo

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow"

test-gpu: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m gpu

bench: $(STAMP)
	$(VPY) -m experiments.bench all --out runs/bench.json

clean:
	rm -rf runs .cache
