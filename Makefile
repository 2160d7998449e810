# sdrt: every target creates or refreshes .venv by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A bare `torch` requirement pulls a multi-GB CUDA build; on a machine without CUDA take the CPU build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench gpu-wheels gpu-install gpu-test gpu-suite gpu-session gpu-suite-dry sm90-report lint \
	clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

DEMO_PROMPT ?= a photo of an astronaut riding a horse on the moon
# tiny -> ONNX -> the same image on eager and on onnxruntime -> a side-by-side table (per-stage ms, PSNR).
demo: $(STAMP)
	mkdir -p out
	HF_HUB_OFFLINE=1 $(BIN)/sdrt info tiny
	HF_HUB_OFFLINE=1 $(BIN)/sdrt export tiny -o out/tiny-onnx
	HF_HUB_OFFLINE=1 $(BIN)/sdrt generate tiny "$(DEMO_PROMPT)" --seed 0 --backend eager -o out/demo-eager.png
	HF_HUB_OFFLINE=1 $(BIN)/sdrt generate tiny "$(DEMO_PROMPT)" --seed 0 --backend onnxruntime \
		--onnx-dir out/tiny-onnx -o out/demo-onnxruntime.png
	HF_HUB_OFFLINE=1 $(BIN)/sdrt bench tiny --backends eager,onnxruntime --runs 3 --prompt "$(DEMO_PROMPT)" \
		--markdown out/demo-bench.md --plot out/demo-bench.png
	@echo "images: out/demo-eager.png out/demo-onnxruntime.png; table: out/demo-bench.md"

# pytest-benchmark per stage (SDRT_BENCH_MODEL=sd15 SDRT_BENCH_SIZE=256 for the real model); not part of `make test`.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest benchmarks/test_stages.py -p no:cacheprovider

# The GPU targets run where torch and triton are preinstalled system-wide: no venv (it would pull a CPU torch).
# diffusers (and anything else missing) may travel as wheels in .whl/; sdrt installs from this tree.
# `make gpu-wheels` here fills .whl/ with what the device machine lacks (it has torch, triton, transformers, onnx,
# onnxruntime): diffusers at this venv's version, and pytest-xdist for gpu-test's workers. Then carry .whl.
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps -d .whl pytest-xdist execnet \
		"diffusers==$$($(BIN)/python -c 'import diffusers; print(diffusers.__version__)')"
	ls .whl

gpu-install:
	if [ -d .whl ]; then PIP_BREAK_SYSTEM_PACKAGES=1 $(PYTHON) -m pip install -q --no-deps --no-index .whl/*.whl; fi
	PIP_BREAK_SYSTEM_PACKAGES=1 $(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

# The tests CI skips: kernels compiled at full SD shapes, bf16, the captured loop. 2-4 min on an H100 with 8
# pytest-xdist workers (Triton compiles dominate); without pytest-xdist they run serially. GPU_PYTEST_ARGS overrides.
GPU_PYTEST_ARGS ?= auto
GPU_PYTEST = HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 $(PYTHON) -m pytest tests/kernels tests/test_torch_backend.py \
	-p no:cacheprovider
XDIST_ARGS = args="$(GPU_PYTEST_ARGS)"; if [ "$$args" = auto ]; then args=""; \
	$(PYTHON) -c "import xdist" 2>/dev/null && args="-n 8"; fi
gpu-test: gpu-install
	$(XDIST_ARGS); $(GPU_PYTEST) $$args

# sd15 512x512 50 steps, every GPU row and the kernel benchmarks, in its 480 s budget (~7 min on an H100).
gpu-suite:
	@test -n "$(OUT)" || { echo "usage: make gpu-suite OUT=DIR" >&2; exit 2; }
	$(MAKE) gpu-install
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 $(PYTHON) benchmarks/gpu_suite.py --out "$(OUT)"

# What a GPU lease is for, as one command that ends inside the device tool's 10-minute call (a second call after
# the machine went idle pays its start again): the GPU tests, stopped after GPU_TEST_S by SIGINT so that pytest
# still reports and writes what ran, then the suite in what is left of GPU_SESSION_S. Files in OUT: gpu_test.log,
# gpu_test.xml (junit), gpu_suite.{json,md,png}, gpu_suite_kernels.md. SUITE_ARGS=--dry-run tries it on a CPU.
GPU_SESSION_S ?= 540
GPU_TEST_S ?= 200
SUITE_ARGS ?=
gpu-session:
	@test -n "$(OUT)" || { echo "usage: make gpu-session OUT=DIR" >&2; exit 2; }
	$(MAKE) gpu-install
	mkdir -p "$(OUT)"
	@start=$$(date +%s); $(XDIST_ARGS); \
	timeout -s INT -k 30 $(GPU_TEST_S) env $(GPU_PYTEST) -q $$args --junitxml="$(OUT)/gpu_test.xml" \
		> "$(OUT)/gpu_test.log" 2>&1; rc=$$?; \
	tail -n 30 "$(OUT)/gpu_test.log"; echo "gpu-test: exit $$rc after $$(( $$(date +%s) - start )) s"; \
	left=$$(( $(GPU_SESSION_S) - $$(date +%s) + start )); echo "gpu-suite: $$left s left"; \
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 $(PYTHON) benchmarks/gpu_suite.py --out "$(OUT)" --budget-s $$left \
		$(SUITE_ARGS)

# The same suite at tiny sizes on the CPU (Triton through its interpreter): proves it runs before a GPU is there.
gpu-suite-dry: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/python benchmarks/gpu_suite.py --dry-run --out out/gpu-suite-dry

# The kernels compiled for sm_90 (H100/H200) on this machine, GPU or not: registers, spills, shared memory, load and
# store widths of every launch at SD shapes. TRITON_INTERPRET must be unset: interpreted kernels do not compile.
sm90-report: $(STAMP)
	cd benchmarks/kernels && env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 ../../$(BIN)/python sm90_report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
