# Two entry points, both safe on a fresh machine: each sets up .venv on first use.
#   make check   the main job: bi-compile check on the embedded tiny model (no download)
#   make test    the test suite, as CI runs it (.ci/run calls this)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: check test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU wheel on this machine's disk; the range in pyproject admits it.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cuda,test]"
	touch $@

check: $(VENV)/.installed
	$(VENV)/bin/bi-compile check

test: $(VENV)/.installed
	$(PY) -m pytest -q
