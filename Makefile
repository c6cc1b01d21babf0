# Two commands for a newcomer: `make demo` runs the main job on the embedded tiny model,
# `make test` runs the test suite. Both bootstrap .venv on first use, from the lock.
# The system CPython is preferred: its shared libpython lets `fbclip-edge serve` host a real
# Triton server (pytriton's backend stub loads it); any Python >= 3.10 runs everything else.
PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
# onnxruntime flavour: cpu (default) or gpu; never both in one environment.
ORT ?= cpu
PIP_VERSION := 26.3
STUBS := tensorrt-stubs==10.13.0.35.1
ifeq ($(ORT),gpu)
EXTRAS := gpu,dev,serve,filo
LOCK := locks/gpu.lock
else
EXTRAS := cpu,dev,serve,openvino,filo
LOCK := locks/cpu.lock
endif

.PHONY: install demo test lint lock clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	# the stubs declare a dependency on tensorrt itself, which is not installable here
	$(BIN)/python -m pip install -q --no-deps $(STUBS)
	touch $@

demo: install
	$(BIN)/fbclip-edge demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check fbclip_edge tests
	$(BIN)/python tools/tensorrt_stubs.py
	$(BIN)/mypy

# Refresh the locks after changing dependencies in pyproject.toml (then run `make test`
# and commit locks/): cpu.lock is what a fresh venv resolves today on this kind of machine,
# gpu.lock the same versions with onnxruntime-gpu (resolved by uv for manylinux x86_64).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q pip==$(PIP_VERSION) uv
	.lock-venv/bin/python -m pip install -q -e ".[cpu,dev,serve,openvino,filo]"
	( echo "# make lock: cpu,dev,serve,openvino,filo extras; $$(.lock-venv/bin/python -V)"; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable --exclude uv ) > locks/cpu.lock
	grep -v -i -E '^(onnxruntime|openvino|openvino-telemetry)==' locks/cpu.lock > .lock-venv/gpu-c.txt
	.lock-venv/bin/uv pip compile -q pyproject.toml --extra gpu --extra dev --extra serve --extra filo \
	    -c .lock-venv/gpu-c.txt --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_35 --no-header -o locks/gpu.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
