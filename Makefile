# make demo : install, then train the tiny model with real TP x PP x DP on CPU
# make test : the whole CPU test suite (GPU tests are marked and skipped without CUDA)
PYTHON ?= python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu bench-smoke bench-gpu clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	@$(PYTHON) -c "import megatron_jinpan.kernels, megatron.core, sentencepiece, transformers, triton, pytest, lm_eval, peft, jinja2" 2>/dev/null \
	  || $(PYTHON) -m pip install -q -e '.[dev]'

demo: install
	bash launch/demo.sh

test: install
	$(PYTHON) -m pytest -m "not gpu" -q $(PYTEST_ARGS) tests

test-gpu: install
	JINPAN_GPU_TESTS=1 $(PYTHON) -m pytest -m gpu -q tests

bench-smoke: install
	$(PYTHON) benchmarks/kernels.py --smoke

# every GPU measurement on one lent GPU (<= 10 min); installs missing packages from .gpu-wheels
bench-gpu:
	PYTHON=$(PYTHON) bash benchmarks/gpu_all.sh

clean:
	rm -rf runs build *.egg-info .pytest_cache
