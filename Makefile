# The two commands a newcomer needs: `make demo` (kdfast's main job) and `make test`. Each sets itself up.
PY ?= python3
JOBS ?= 2
OUT ?= gpu-results

.PHONY: setup build test fuzz demo llm-demo bench bench-run cuda-compile gpu-check clean

# Installs what is missing (torch only if absent: on a GPU machine the installed CUDA torch is kept; then the test
# extra, requirements-dev.txt: the trainer's and the LLM demo's packages, pytest, pytest-benchmark, ruff) and builds the extension in
# place, so that `python -m kdfast` and pytest use this checkout.
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import pytest, pytest_benchmark, ruff, numpy, matplotlib, sklearn, tqdm, tokenizers" 2>/dev/null || \
		$(PY) -m pip install -q -r requirements-dev.txt
	@$(MAKE) --no-print-directory build

build:
	MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace

test: setup
	$(PY) -m pytest tests -q

# The differential fuzz of every op against the reference (tests/test_fuzz.py) for FUZZ_SECONDS in all, with a new
# seed each run (FUZZ_SEED=n repeats one); `make test` runs a fixed number of cases with seed 0.
FUZZ_SECONDS ?= 1800
FUZZ_SEED ?= $(shell date +%s)
fuzz: setup
	KDFAST_FUZZ_SECONDS=$(FUZZ_SECONDS) KDFAST_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest tests/test_fuzz.py -q -s

demo: setup
	$(PY) -m kdfast demo

# The LLM main job (CPU, about 5 minutes): needs the `llm` extra (tokenizers), installed here when missing.
llm-demo: setup
	@$(PY) -c "import tokenizers" 2>/dev/null || $(PY) -m pip install -q "tokenizers>=0.15"
	$(PY) -m kdfast llm-demo

# Benchmarks of every op on this machine (CPU, or the GPU where there is one), then the report
# (benchmarks/results/<name>.json, .md, .png). BENCH_FILES=bench_logits.py and BENCH='-k llm' narrow the run.
bench: setup bench-run

# One process per bench file, so that no file's compiled graphs or allocator state colour another's.
BENCH_FILES ?= $(notdir $(wildcard benchmarks/bench_*.py))
bench-run:
	@rm -rf build/bench && mkdir -p build/bench
	cd benchmarks && for f in $(BENCH_FILES); do $(PY) -m pytest $$f \
		-o python_files='bench_*.py' -q -p no:cacheprovider --benchmark-json=$(CURDIR)/build/bench/$${f%.py}.json \
		$(BENCH) || exit 1; done
	$(PY) benchmarks/report.py build/bench/*.json $(if $(NAME),--name $(NAME))

# Compiles the torch-free CUDA kernels alone for sm_80 and sm_90 (CI's check; ptxas reports with VERBOSE=1).
cuda-compile:
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release $(if $(VERBOSE),-DKDFAST_PTXAS_VERBOSE=ON) >/dev/null
	cmake --build cmake-build -j $(JOBS)

# On a GPU machine: build for sm_90, every op against the CPU kernels and the float64 reference, the CUDA tests,
# compute-sanitizer, the headline GPU benchmarks; results under $(OUT) (docs/gpu-check.md). CALL=call1 or call2 runs
# one of the two device calls; DRY=1 runs every step on the CPU with tiny sizes.
CALL ?= all
gpu-check:
	$(PY) benchmarks/gpu_check.py $(CALL) --out $(OUT) $(if $(DRY),--dry-run)

clean:
	rm -rf build cmake-build kdfast/*.so
