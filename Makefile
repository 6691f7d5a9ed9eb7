# The two commands a newcomer needs (see README):
#   make demo   set everything up, then run the NSA demo (works on a CPU-only machine)
#   make test   set everything up, then run the tests (what CI runs)
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A plain `torch` requirement would pull a multi-GB CUDA build; pin the CPU wheel.
TORCH ?= torch==2.13.0

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m sparsedsl demo

test: $(VENV)/.installed
	$(PY) -m pytest
