# Two entry points for a fresh clone: `make demo` and `make test` (README). Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must be an exact matching pair (torchvision registers C++ ops against torch).
# Override for another CUDA/CPU build, e.g. make setup TORCH="torch==2.5.1 torchvision==0.20.1".
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=68" wheel
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# sam2 ships as an sdist whose setup.py imports torch; build against the installed torch and skip
	# its optional CUDA post-processing kernel (not used by astrea).
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation "sam2==1.1.0"
	$(BIN)/python -c "import torch, torchvision, sam2, open_clip, transformers, ray, zarr, webdataset; print('astrea env ok: torch', torch.__version__)"
	touch $@

demo: setup
	$(BIN)/astrea demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
