# Two commands on a fresh machine with python3: `make demo` and `make test`.
# Both create .venv and install the project first (CPU torch where there is no GPU).
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: demo test clean

$(STAMP):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	 else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	rm -f .venv/.installed-*; touch $@

demo: $(STAMP)
	.venv/bin/deepspeed --num_gpus 2 launcher/run.py --config recipes/demo-cpu.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf out .pytest_cache
