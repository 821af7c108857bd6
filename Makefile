# The two commands a newcomer needs: `make demo` (kdfast's main job) and `make test`. Each sets itself up.
PY ?= python3
JOBS ?= 2
OUT ?= gpu-results

.PHONY: setup build test qemu-test fuzz demo llm-demo bench bench-run cuda-compile cuda-build cuda-emulation \
	cuda-emulation-drivers gpu-check install-check clean

# Installs what is missing (torch only if absent: on a GPU machine the installed CUDA torch is kept; then the test
# extra, requirements-dev.txt: the trainer's and the LLM demo's packages, pytest, pytest-benchmark, ruff) and builds the extension in
# place, so that `python -m kdfast` and pytest use this checkout.
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import pytest, pytest_benchmark, ruff, numpy, matplotlib, sklearn, tqdm, tokenizers, transformers, trl, pyarrow" 2>/dev/null || \
		$(PY) -m pip install -q -r requirements-dev.txt
	@$(MAKE) --no-print-directory build

build:
	MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace

test: setup
	$(PY) -m pytest tests -q

# Every op on CPU models without AVX-512, without AVX2 and without AVX, under qemu-user (Debian: apt-get install
# qemu-user), each with the instruction set the dispatch must pick: a function compiled for a higher instruction set
# that reached a lower one's callers dies there with SIGILL (docs/architecture.md).
QEMU_MODELS ?= Haswell:avx2 IvyBridge:default Nehalem:default
qemu-test: setup
	@command -v qemu-x86_64 >/dev/null || { echo "qemu-test needs qemu-x86_64 (Debian: apt-get install qemu-user)"; exit 1; }
	@python=$$($(PY) -c "import sys; print(sys.executable)"); for m in $(QEMU_MODELS); do echo "== $${m%%:*}"; \
		KDFAST_EXPECT_CPU_CAPABILITY=$${m#*:} qemu-x86_64 -cpu $${m%%:*} $$python -m pytest tests/test_cpu_isa.py \
		-q -p no:cacheprovider || exit 1; done
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

# Compiles the torch-free CUDA kernels alone with CMake, for the architectures of csrc/cuda/archs.txt (ptxas
# register and spill reports with VERBOSE=1).
cuda-compile:
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release $(if $(VERBOSE),-DKDFAST_PTXAS_VERBOSE=ON) >/dev/null
	cmake --build cmake-build -j $(JOBS)

# CI's CUDA build (no GPU needed): the whole extension, every .cu and binding, for the default architectures
# (csrc/cuda/archs.txt), against the CUDA wheel of torch in a venv of its own outside the checkout (CUDA_VENV: made
# when missing, about 5 GB, and reused while its torch is $(CUDA_TORCH)); then it imports the build and checks that
# every kdfast op has a CUDA kernel (python -m kdfast._registry) and runs tests/test_cuda_build.py with it. The
# build goes to build/cuda, so the checkout's own (CPU) extension is untouched. pip runs without the machine's pip
# configuration (which may point at a local CPU wheel and constraints).
CUDA_TORCH ?= 2.13.0
CUDA_VENV ?= $(or $(KDFAST_CUDA_VENV),$(HOME)/.cache/kdfast/cuda-venv)
cuda-build:
	@$(CUDA_VENV)/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(CUDA_TORCH)' \
		or torch.version.cuda is None)" 2>/dev/null || { $(PY) -m venv --clear $(CUDA_VENV) && \
		env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null $(CUDA_VENV)/bin/pip install -q \
		torch==$(CUDA_TORCH) setuptools wheel ninja; }
	@$(CUDA_VENV)/bin/python -c "import pytest, numpy" 2>/dev/null || \
		env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null $(CUDA_VENV)/bin/pip install -q pytest numpy
	rm -rf build/cuda
	PATH=$(CUDA_VENV)/bin:$$PATH CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} CCACHE_BASEDIR=$${CCACHE_BASEDIR:-$(CURDIR)} \
		KDFAST_CUDA=1 MAX_JOBS=$(JOBS) NVCC_APPEND_FLAGS=-Werror=all-warnings \
		$(CUDA_VENV)/bin/python setup.py -q build --build-base build/cuda --build-lib build/cuda/lib
	cd build/cuda/lib && $(CUDA_VENV)/bin/python -m kdfast._registry CUDA && \
		$(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider -o pythonpath= $(CURDIR)/tests/test_cuda_build.py
# The CUDA kernels run on the CPU (docs/cuda-emulation.md): the emulation's standalone driver built plain, with
# ASan + UBSan and with TSan, then the op tests of the emulated kernels against the CPU kernels and the reference
# (`make test` runs those op tests too, so CI runs only the drivers after it: cuda-emulation-drivers).
cuda-emulation: build cuda-emulation-drivers
	$(PY) -m pytest tests/test_cuda_emulation.py -q -m cuda_emulation

cuda-emulation-drivers:
	JOBS=$(JOBS) $(PY) tests/cuda_emulation/emulation_build.py drivers

# On a GPU machine: build for sm_90, every op against the CPU kernels and the float64 reference, the CUDA tests,
# compute-sanitizer, the headline GPU benchmarks; results under $(OUT) (docs/gpu-check.md). CALL=call1 or call2 runs
# one of the two device calls; DRY=1 runs every step on the CPU with tiny sizes.
CALL ?= all
gpu-check:
	$(PY) benchmarks/gpu_check.py $(CALL) --out $(OUT) $(if $(DRY),--dry-run)

# The README's install, as a newcomer does it: a fresh clone into a new virtual environment (INSTALL_VENV, made anew),
# torch, `pip install --no-build-isolation .`, the losses with numpy absent, then each extra and `pip check`. It
# compiles the extension from scratch (about 11 minutes on 2 loaded cores), so it is not part of CI.
INSTALL_VENV ?= /tmp/kdfast-install-check
install-check:
	rm -rf $(INSTALL_VENV) && $(PY) -m venv $(INSTALL_VENV) && git clone -q . $(INSTALL_VENV)/src
	$(INSTALL_VENV)/bin/pip install -q torch==2.13.0
	cd $(INSTALL_VENV)/src && MAX_JOBS=$(JOBS) $(INSTALL_VENV)/bin/pip install -q --no-build-isolation .
	cd $(INSTALL_VENV) && bin/python -c "import importlib.util, torch, kdfast; \
		assert importlib.util.find_spec('numpy') is None, 'numpy came with the losses'; \
		s = torch.randn(4, 10, requires_grad=True); kdfast.kd_div(s, torch.randn(4, 10)).backward(); print('losses: ok')"
	cd $(INSTALL_VENV)/src && for e in train llm hf parquet test; do \
		$(INSTALL_VENV)/bin/pip install -q --no-build-isolation ".[$$e]" || exit 1; done
	$(INSTALL_VENV)/bin/pip check && cd $(INSTALL_VENV) && bin/python -m kdfast --help

clean:
	rm -rf build cmake-build kdfast/*.so
