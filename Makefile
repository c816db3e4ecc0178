# The two commands of the README contract: `make demo` and `make test`.
# Each builds .venv from nothing (CPU torch first, so no CUDA build is ever pulled).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)"
	# DeepSpeed ships no wheel; its setup.py imports torch, so build it beside ours.
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.19.8,<0.20"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	# k8s/ is rendered with kubectl's built-in kustomize (docs/design.md §6).
	command -v kubectl >/dev/null || (apt-get update -qq && apt-get install -y -qq kubectl)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m pipeline.demo

bench: $(STAMP)
	$(BIN)/python -m bench

bench-gpu: $(STAMP)
	$(BIN)/python -m bench.gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
