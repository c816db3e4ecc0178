# The two commands of the README contract: `make demo` and `make test`.
# Each builds .venv from nothing (CPU torch first, so no CUDA build is ever pulled).
# The GPU targets (bench-gpu, smoke-gpu, test-gpu) build their own .venv-gpu with a CUDA torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
DEEPSPEED := deepspeed>=0.19.8,<0.20

GPU_VENV  := .venv-gpu
GPU_BIN   := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.installed
GPU_TORCH ?= torch>=2.13,<2.15
GPU_GOALS := bench-gpu smoke-gpu test-gpu
# The image the manifests name (k8s/components/cluster/kustomization.yaml `images:`).
IMAGE     ?= registry.example.com/eerpipe:0.1.0

.PHONY: demo test test-fast lint bench rehearsal $(GPU_GOALS) image clean

# A GPU target on a machine without a CUDA GPU stops here, in one line and with exit status 2,
# before anything is built: its venv alone is gigabytes of CUDA libraries.
ifneq ($(filter $(GPU_GOALS),$(MAKECMDGOALS)),)
ifneq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo found),found)
$(error $(firstword $(filter $(GPU_GOALS),$(MAKECMDGOALS))): no CUDA GPU here (nvidia-smi found none); \
  run it on a GPU machine)
endif
endif

# $(call install_venv,FOLDER,TORCH): a venv with that torch first, DeepSpeed built against it
# (it ships no wheel and its setup.py imports torch), then this project with its test extras.
define install_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip setuptools wheel
	$(1)/bin/pip install -q "$(2)"
	$(1)/bin/pip install -q --no-build-isolation "$(DEEPSPEED)"
	$(1)/bin/pip install -q -e ".[test]"
endef

$(STAMP): pyproject.toml
	$(call install_venv,$(VENV),$(TORCH))
	touch $(STAMP)

# PyPI's default torch wheel for Linux is a CUDA build; the last line refuses a torch that cannot
# use this machine's GPU (a CPU wheel, or a driver older than the wheel's CUDA) before the stamp.
$(GPU_STAMP): pyproject.toml
	$(call install_venv,$(GPU_VENV),$(GPU_TORCH))
	$(GPU_BIN)/python -c "import sys, torch; torch.cuda.is_available() or sys.exit( \
		f'$(GPU_VENV): torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU')"
	touch $(GPU_STAMP)

test: $(STAMP)
	# k8s/ is rendered with kubectl's built-in kustomize (docs/design.md §6).
	command -v kubectl >/dev/null || (apt-get update -qq && apt-get install -y -qq kubectl)
	$(BIN)/python -m pytest

# The unit specifications only: no Ray, DeepSpeed or S3 server end to end, no GPU (under 2 minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu"

# ruff and mypy, both configured in pyproject.toml (ruff skips .venv*, build and docs there).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m pipeline.demo

bench: $(STAMP)
	$(BIN)/python -m bench

# The KVC desktop sizes end to end (115,120 + 15,000 synthetic users, S3 on a local moto server),
# at most an hour on 2 cores: bench/rehearsal.py; REHEARSAL_SUBJECTS=… for a smaller corpus.
rehearsal: $(STAMP)
	$(BIN)/python -m bench.rehearsal

bench-gpu: $(GPU_STAMP)
	$(GPU_BIN)/python -m bench.gpu

smoke-gpu: $(GPU_STAMP)
	$(GPU_BIN)/python -m bench.smoke_gpu

test-gpu: $(GPU_STAMP)
	$(GPU_BIN)/python -m pytest -m gpu

# The training image (k8s/README.md), from the repository root: only BuildKit reads
# k8s/Dockerfile.dockerignore, which keeps .venv, data and runs out of the build context.
image:
	DOCKER_BUILDKIT=1 docker build -f k8s/Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) $(GPU_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
