# Two-command setup: `make demo` (environment + both samples) and `make test` (full suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: all venv demo stereo test bench weights golden clean

all: test

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) pytorch/sample_code.py
	$(PY) tensorflow/sample_code.py

stereo: $(STAMP)
	$(PY) examples/stereo.py

test: $(STAMP)
	$(PY) -m pytest shared_tests -q

bench: $(STAMP)
	$(PY) bench/bench.py --json bench/results_cpu.json --merge bench/results_cuda.json
	$(PY) bench/parity.py --out bench/RESULTS_parity.md
	$(PY) bench/parity.py --keep-freed-memory --out bench/RESULTS_parity_keep.md
	$(PY) bench/efficiency.py --out bench/RESULTS_efficiency.md
	$(PY) bench/shifts_in_place.py --out bench/RESULTS_shifts_in_place.md
	$(PY) bench/transposed.py --out bench/RESULTS_transposed.md
	$(PY) bench/train_step.py --out bench/RESULTS_train.md
	$(PY) bench/output_stride.py --out bench/RESULTS_output_stride.md
	$(PY) bench/deploy.py --out bench/RESULTS_deploy.md
	$(PY) bench/bfloat16.py --out bench/RESULTS_bfloat16.md
	$(PY) bench/memory_budget.py --out bench/RESULTS_memory.md
	$(PY) bench/allocator.py --out bench/RESULTS_allocator.md

weights: $(STAMP)
	$(PY) weights/make_weights.py

golden: $(STAMP)
	$(PY) weights/make_golden.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
