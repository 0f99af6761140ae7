# roar: two commands on a fresh clone — `make demo` and `make test`. Both create .venv when needed.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   := torch==2.14.1 torchvision==0.29.1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo demo-vq study test test-slow test-all test-gpu bench bench-gpu bench-gpu-dry gpu-wheels clean

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

# the demo's arms plus raster / RandAR / ARPG on the codes of the project's digits VQ (trained first: ~2 min)
demo-vq: $(STAMP)
	$(VPY) -m experiments.demo --vq-variants raster,randar,arpg

# The order study (experiments/study.py): 12 orderings/scans x 3 seeds (+ 3 on the digits VQ), about an hour+ on
# CPU; resumable (finished runs are collected, not retrained). Writes docs/study.md's generated block.
study: $(STAMP)
	$(VPY) -m experiments.study

# `make test`: every test not marked slow (under ~15 min on 2 cores). The slow tier holds the multi-rank runs with
# every callback on, the README walks and the paper presets at debug size; CI (.ci/run) runs both tiers.
test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow and not gpu"

test-slow: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "slow and not gpu"

test-all: test test-slow

test-gpu: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m gpu

bench: $(STAMP)
	$(VPY) -m experiments.bench all --out runs/bench.json

# The GPU suite (experiments/bench_gpu.py): GPU tests, sampling and training per ordering, < 10 minutes on one GPU.
# No $(STAMP): the GPU image brings its own torch (2.11) and cannot reach a registry, so this runs the .venv's
# python where there is one and the python on PATH otherwise; a missing package is named in one line.
BENCH_PY ?= $(if $(wildcard $(VPY)),$(VPY),python3)
bench-gpu:
	$(BENCH_PY) -m experiments.bench all --device cuda --suite gpu --out runs/bench/gpu.json

# The same code on this CPU at toy sizes (no GPU needed): checks the script end to end.
bench-gpu-dry:
	$(BENCH_PY) -m experiments.bench all --suite gpu --dry-run --threads 1 --out runs/bench/gpu_dry.json

# Wheels for a lent GPU, whose image (torch 2.11, Python 3.12, no registry) lacks these of roar's packages and
# their needs (its list: /work/.library/device/KINDS.md; bench-gpu's preflight names any other): this .venv's
# versions, binary wheels for cp312, else built here (deepspeed ships an sdist only; its ops build on first use).
# The device command: docs/benchmarks.md, "On a lent GPU".
GPU_WHEELS := omegaconf webdataset braceexpand torch-fidelity deepspeed hjson pydantic pydantic-core annotated-types \
              typing-inspection typing-extensions
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir .whl
	for p in $(GPU_WHEELS); do \
	  v=$$($(VPY) -c "import importlib.metadata as m; print(m.version('$$p'))") || exit 1; \
	  $(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$p==$$v" 2>/dev/null || $(VPY) -m pip wheel -q --no-deps --no-build-isolation -w .whl "$$p==$$v" \
	    || { echo "gpu-wheels: no wheel for $$p==$$v"; exit 1; }; \
	done
	ls .whl

clean:
	rm -rf runs .cache
