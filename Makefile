# Two commands do all the setup: `make demo` and `make test`.
# torch is pinned and installed first so a CPU machine does not pull a multi-GB CUDA
# wheel through a dependency range; a CUDA user installs their own torch beforehand
# (the check below keeps any torch that is already importable).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,tensorboard]"
	@mkdir -p .make && touch $(STAMP)

demo: install
	distill demo --quick --out runs/demo

test: install
	$(PYTHON) -m pytest -q --timeout=1500 --durations=30 tests

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

bench: install
	$(PYTHON) bench/moe.py
	$(PYTHON) bench/loss.py
	$(PYTHON) bench/cache.py
	$(PYTHON) bench/codistill.py

clean:
	rm -rf .make runs build *.egg-info
