# Two entry points (README): `make run` and `make test`. Both create .venv in the repo root and
# install everything they need; torch is pinned first so pip takes the CPU build on disk instead
# of pulling a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is

.PHONY: run test setup setup-test kernels clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Chromium for the chat-page test (Debian package; skipped with a reason where apt is unavailable).
$(VENV)/.chromium: scripts/install_chromium.sh
	bash scripts/install_chromium.sh
	touch $@

# The C++ kernels build during set-up (about a minute, once per machine, cached in
# ~/.cache/gemma3/kernels), so the first generate does not wait for the compiler.
kernels: $(VENV)/.installed
	$(BIN)/python -c "from gemma3.cpu import kernels; kernels.ops()"

setup: $(VENV)/.installed kernels
setup-test: $(VENV)/.installed-test $(VENV)/.chromium kernels

run: setup
	$(BIN)/gemma3 generate "$(PROMPT)" --max-tokens 32

test: setup-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
