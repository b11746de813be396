# Set-up is part of every target: the first call builds .venv (torch 2.14.1 + torchvision 0.29.1 first,
# then dvtrain with constraints that keep that pair), later calls reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= 8 else f'error: building $(VENV) needs about 8 GiB free on this disk ({free:.1f} GiB free): torch with its CUDA libraries, Triton and DeepSpeed take 7 GiB')"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,xformers]"
	$(BIN)/python -c "import torch, torchvision, deepspeed, streaming, triton; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dvtrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not dist"

bench: $(STAMP)
	$(BIN)/python -m dvtrain bench kernels

clean-venv:
	rm -rf $(VENV)
