# Two commands for a newcomer: `make demo` runs the main job on the embedded tiny model,
# `make test` runs the test suite. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# onnxruntime flavour: cpu (default) or gpu; never both in one environment.
ORT ?= cpu

.PHONY: install demo test lint clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(ORT),dev]"
	touch $@

demo: install
	$(BIN)/fbclip-edge demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check fbclip_edge tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
